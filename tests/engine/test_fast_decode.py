"""The whole-block C decode path gives what the torch path gives, in every model variant."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import random_prompts

from trustmoe.config import get_preset
from trustmoe.engine import Engine, SamplingParams, cpu_kernels
from trustmoe.engine.fast_decode import FastDecoder
from trustmoe.model import Transformer

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: kernels not built")

VARIANTS = {
    "moe": {},
    "dense": {"num_local_experts": 0, "num_experts_per_tok": 0},
    "shared-expert": {"shared_expert_intermediate_size": 48},
    "mqa-top1-unnormalised": {"num_key_value_heads": 1, "num_experts_per_tok": 1,
                              "norm_topk_prob": False},
}


def _model(**over: object) -> Transformer:
    cfg = get_preset("tiny").model
    if over.get("num_local_experts") == 0:
        cfg = get_preset("tiny-dense").model
        over = {}
    cfg = dataclasses.replace(cfg, **over)  # type: ignore[arg-type]
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # clear greedy winners
    return m


def _run(m: Transformer, fast: bool, quantize: str | None = None, n: int = 12,
         prefill_chunk: int = 256) -> list[tuple[list[int], list[float]]]:
    eng = Engine(m, kv_cache_mb=4, fast_decode=fast, quantize=quantize, group_size=16,
                 prefill_chunk=prefill_chunk)
    assert (eng.runner.fast is not None) == fast
    prompts = random_prompts([5, 17, 9, 30, 3], m.config.vocab_size, seed=3)
    sp = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=0)
    out = eng.generate(prompts, params=sp)
    return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in out]


def _same(a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]]) -> None:
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        assert ta == tb
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=2e-4, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_path_matches_torch_path(variant: str) -> None:
    m = _model(**VARIANTS[variant])
    _same(_run(m, True), _run(m, False))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fast_path_matches_torch_path_quantized(mode: str) -> None:
    m = _model()
    _same(_run(m, True, mode), _run(m, False, mode))


def test_two_threads_and_mixed_prefill_decode_steps() -> None:
    """Small prefill chunks put prefill and decode rows in the same steps; two threads split
    every product, so the barriers and row splits of the C blocks are exercised."""
    m = _model(shared_expert_intermediate_size=48)
    torch.set_num_threads(2)  # the autouse fixture restores it
    _same(_run(m, True, prefill_chunk=4), _run(m, False, prefill_chunk=4))
    _same(_run(m, True, "int4", prefill_chunk=4), _run(m, False, "int4", prefill_chunk=4))


def test_more_rows_than_one_kernel_call_takes() -> None:
    m = _model()
    eng = Engine(m, kv_cache_mb=8)
    prompts = random_prompts([4 + i % 7 for i in range(cpu_kernels.MAX_ROWS + 5)], m.config.vocab_size, seed=4)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    batch = eng.generate(prompts, params=sp)
    alone = [eng.generate([p], params=sp)[0] for p in prompts[-3:]]
    assert [r.token_ids for r in batch[-3:]] == [r.token_ids for r in alone]


def test_unsupported_says_why() -> None:
    m = _model()
    eng = Engine(m, kv_cache_mb=4, dtype="bfloat16")
    assert eng.runner.fast is None
    assert FastDecoder.unsupported(eng.weights, eng.kv, torch.device("cpu")) == "not fp32"


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_weights_are_packed_in_read_order_without_changing_them(mode: str | None) -> None:
    from trustmoe.engine.arena import pack_weights
    from trustmoe.engine.weights import build_weights
    from trustmoe.model.hf import hf_state_dict

    m = _model(shared_expert_intermediate_size=48)
    w = build_weights(hf_state_dict(m), m.config, mode, group_size=16)
    order = []
    for lw in w.layers:
        order += [lw.wqkv, lw.wo, lw.router, lw.shared_gate, lw.shared13, lw.shared2]
        for a, b in zip(lw.w13, lw.w2, strict=True):
            order += [a, b]
    order.append(w.lm_head)
    before = [x.dequantize().clone() for x in order if x is not None]
    assert pack_weights(w) is not None
    after = [x.dequantize() for x in order if x is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    ptrs = [x.c_desc().w for x in order if x is not None]  # type: ignore[union-attr]
    assert ptrs == sorted(ptrs) and ptrs[0] % (2 << 20) == 0  # one block, read order, 2 MiB aligned


def test_prefill_moe_in_fixed_blocks_is_row_independent() -> None:
    """Batch-invariant prefill runs every expert through the compiled GEMM (invariant at any
    row count); without it, in zero-padded blocks of a probed fixed size, so a row's result
    does not depend on which prompts share the step."""
    from trustmoe.engine.invariance import blocked_mm, probe_block_rows
    from trustmoe.engine.quantize import FloatWeight

    m = _model()
    eng = Engine(m, kv_cache_mb=4)
    assert eng.runner.gemm_rows and eng.runner.moe_block_rows is None
    B = probe_block_rows([w for lw in eng.weights.layers for w in lw.w13 + lw.w2], torch.float32,
                         torch.device("cpu"))
    assert B is not None and B > cpu_kernels.MAX_ROWS
    w = FloatWeight(torch.randn(96, 64, generator=torch.Generator().manual_seed(5)))
    assert probe_block_rows([w], torch.float32, torch.device("cpu")) == B
    x = torch.randn(3 * B + 5, 64, generator=torch.Generator().manual_seed(6))
    full = blocked_mm(w, x, B)
    torch.testing.assert_close(full, x @ w.w.t(), atol=1e-4, rtol=1e-4)
    for i in (0, B + 1, 3 * B + 4):  # each row alone gives the same bits
        assert torch.equal(blocked_mm(w, x[i: i + 1], B)[0], full[i])
    assert Engine(m, kv_cache_mb=4, batch_invariant=False).runner.moe_block_rows is None


def test_long_context_attention_matches_torch_path() -> None:
    """Hundreds of cached positions (the vectorised exp and softmax over many slots, slot
    lists that span many KV blocks), several query heads per KV head, two threads."""
    m = _model(num_key_value_heads=1)
    torch.set_num_threads(2)  # the autouse fixture restores it
    n = m.config.max_position_embeddings
    prompts = random_prompts([n - 20, n // 2 + 3], m.config.vocab_size, seed=9)
    sp = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=0)

    def run(fast: bool) -> list[tuple[list[int], list[float]]]:
        eng = Engine(m, kv_cache_mb=8, fast_decode=fast)
        return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in eng.generate(prompts, params=sp)]

    _same(run(True), run(False))


def test_float16_cache_fast_path_matches_torch_path_and_stays_invariant() -> None:
    """kv_cache_dtype="float16": both paths read the same rounded keys and values and attend
    in fp32; a request gives the same tokens alone or batched; the cache takes half the bytes."""
    m = _model(num_key_value_heads=1)
    n = m.config.max_position_embeddings
    prompts = random_prompts([n - 20, 37, 5], m.config.vocab_size, seed=10)
    sp = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=0)

    def run(fast: bool, batch: bool = True) -> list[tuple[list[int], list[float]]]:
        eng = Engine(m, kv_cache_mb=8, fast_decode=fast, kv_cache_dtype="float16")
        assert eng.kv.k.dtype == torch.float16 and (eng.runner.fast is not None) == fast
        res = eng.generate(prompts, params=sp) if batch else \
            [eng.generate([p], params=sp)[0] for p in prompts]
        return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in res]

    fast = run(True)
    _same(fast, run(False))
    assert fast == run(True, batch=False)  # bit for bit alone or batched
    half = Engine(m, kv_cache_mb=8, kv_cache_dtype="float16").kv.num_blocks
    assert half == 2 * Engine(m, kv_cache_mb=8).kv.num_blocks
