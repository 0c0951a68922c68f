"""Every ModelConfig option: the engine computes the model's function, on both of its paths.

For each variant, the engine's torch path and its C-kernel decode path (fp32, CPU) run two
prompts at once through the paged KV cache (blocks of 4 tokens, prompts prefilled in chunks of
5), then several greedy decode steps. The raw logits the engine samples from (captured by a
logits processor, the public hook) must equal the training model's full-sequence logits at
the same positions to 1e-5, the prompt log-probabilities likewise, and greedy tokens must be
identical. Tiny shapes: the whole matrix runs in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from engine_helpers import random_prompts
from torch import Tensor

from trustmoe.config import ModelConfig
from trustmoe.engine import Engine, SamplingParams, cpu_kernels
from trustmoe.model import Transformer, save_model

ATOL = 1e-5
STEPS = 5
BASE = ModelConfig(
    vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=64,
)
VARIANTS: dict[str, dict[str, object]] = {
    "base-gqa2-top2": {},
    "mha-gqa1": {"num_key_value_heads": 4},
    "gqa4-head-dim-8": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8},
    "mqa": {"num_key_value_heads": 1},
    "head-dim-12-not-d-over-h": {"head_dim": 12},
    "shared-expert": {"shared_expert_intermediate_size": 20},
    "tied-embeddings": {"tie_word_embeddings": True},
    "norm-topk-off": {"norm_topk_prob": False},
    "rope-theta-1e6-eps-1e-6": {"rope_theta": 1e6, "rms_norm_eps": 1e-6},
    "rope-theta-500": {"rope_theta": 500.0},
    "top1": {"num_experts_per_tok": 1},
    "top3-of-4": {"num_experts_per_tok": 3},
    "top3-norm-off-shared-mqa": {"num_experts_per_tok": 3, "norm_topk_prob": False,
                                 "shared_expert_intermediate_size": 16, "num_key_value_heads": 1},
    "dense": {"num_local_experts": 1, "num_experts_per_tok": 1, "intermediate_size": 48},
    "dense-tied-mqa": {"num_local_experts": 1, "num_experts_per_tok": 1, "tie_word_embeddings": True,
                       "num_key_value_heads": 1},
    "capacity-factor-is-training-only": {"capacity_factor": 0.5},
}


def _model(over: dict[str, object], seed: int = 0) -> Transformer:
    cfg = dataclasses.replace(BASE, **over)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():  # weights larger than the 0.02 init: routing, norms and heads all matter
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return m.eval()


class _Recorder:
    """A logits processor that keeps the raw logits row of every step, unchanged."""

    def __init__(self) -> None:
        self.rows: list[Tensor] = []

    def __call__(self, generated: list[int], logits: Tensor) -> Tensor:
        assert len(generated) == len(self.rows)  # one call per step, in order
        self.rows.append(logits.detach().clone())
        return logits


def _engine_run(eng: Engine, prompts: list[list[int]]) -> list[tuple[list[int], Tensor, list[float]]]:
    """Both prompts in one batch -> per prompt: greedy ids, sampled-from logits (STEPS, V),
    prompt logprobs."""
    recs = [_Recorder() for _ in prompts]
    params = [SamplingParams(max_tokens=STEPS, ignore_eos=True, prompt_logprobs=0,
                             logits_processors=[r]) for r in recs]
    outs = eng.generate(prompts, params=params)
    res = []
    for o, r in zip(outs, recs, strict=True):
        assert len(o.token_ids) == STEPS and len(r.rows) == STEPS
        res.append((o.token_ids, torch.stack(r.rows), [float(x) for x in o.prompt_logprobs[1:]]))
    return res


def _check_against_model(m: Transformer, prompts: list[list[int]],
                         got: list[tuple[list[int], Tensor, list[float]]]) -> None:
    for prompt, (ids, rows, plps) in zip(prompts, got, strict=True):
        full = torch.tensor([prompt + ids])  # (1, P + STEPS)
        with torch.no_grad():
            logits = m(full)[0]  # (P + STEPS, V), no cache, no paging
        P = len(prompt)
        ref = logits[P - 1: P - 1 + STEPS]  # the rows that predict each generated token
        torch.testing.assert_close(rows, ref, atol=ATOL, rtol=0)
        assert ids == ref.argmax(-1).tolist()  # the model's own greedy continuation
        lp = torch.log_softmax(logits[: P - 1], -1).gather(1, torch.tensor(prompt[1:])[:, None])
        torch.testing.assert_close(torch.tensor(plps), lp.squeeze(1), atol=ATOL, rtol=0)


def _engine(m: Transformer | Path, fast: bool) -> Engine:
    return Engine(m, device="cpu", kv_cache_mb=1, block_size=4, prefill_chunk=5, fast_decode=fast)


@pytest.mark.parametrize("path", ["torch", "c-kernels"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_logits_equal_the_model(variant: str, path: str) -> None:
    fast = path == "c-kernels"
    if fast and not cpu_kernels.available():
        pytest.skip("no C compiler: kernels not built")
    m = _model(VARIANTS[variant])
    eng = _engine(m, fast)
    assert (eng.runner.fast is not None) == fast  # the path under test really runs
    prompts = random_prompts([7, 12], m.config.vocab_size, seed=1)
    _check_against_model(m, prompts, _engine_run(eng, prompts))


def test_capacity_factor_drops_only_in_training() -> None:
    """model.train() drops tokens beyond capacity; model.eval() and the engine do not."""
    m = _model(VARIANTS["capacity-factor-is-training-only"])
    prompts = random_prompts([7, 12], m.config.vocab_size, seed=1)
    got = _engine_run(_engine(m, fast=False), prompts)
    full = torch.tensor([prompts[1] + got[1][0]])
    with torch.no_grad():
        evaluated = m.run(full, return_stats=True)
        m.train()
        trained = m.run(full, return_stats=True)
        m.eval()
    assert all(s.dropped == 0 for s in evaluated.routing)
    assert sum(s.dropped for s in trained.routing) > 0
    assert not torch.allclose(trained.logits, evaluated.logits, atol=1e-3)
    _check_against_model(m, prompts, got)  # the engine matches the eval-mode (dropless) model


@pytest.mark.parametrize("variant", ["shared-expert", "tied-embeddings", "dense"])
def test_model_directory_gives_the_same_engine(variant: str, tmp_path: Path) -> None:
    """Weights read by name from model.safetensors equal those read from the module (to fp32
    round-off: without the kernels' arena, MKL's results depend on the weights' alignment)."""
    m = _model(VARIANTS[variant])
    save_model(m, tmp_path)
    prompts = random_prompts([7, 12], m.config.vocab_size, seed=2)
    a = _engine_run(_engine(m, fast=False), prompts)
    b = _engine_run(_engine(tmp_path, fast=False), prompts)
    for (ia, ra, pa), (ib, rb, pb) in zip(a, b, strict=True):
        assert ia == ib
        torch.testing.assert_close(ra, rb, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(pa), torch.tensor(pb), atol=ATOL, rtol=0)
