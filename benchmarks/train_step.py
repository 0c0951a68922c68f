"""Training throughput: trustmoe vs transformers' MixtralForCausalLM, same weights, same batch.

One fwd + bwd + AdamW step of a (batch x seq) fp32 batch on the bench-small shape of
`shared/bench-shapes.json`. trustmoe is measured exactly as `trustmoe.train` runs it:
`trustmoe.model.fast.optimize_for_training(model)`, `trustmoe.train.optim.make_optimizer` and
`model.run(idx, targets, return_stats=True)` (cross-entropy + load-balancing + z-loss). transformers gets the same
weights through our Hugging Face export (`save_model` + `from_pretrained`) and its stock
`torch.optim.AdamW` (fused, as the trainer's). Both steps clip gradients to norm 1.0 as
the trainer does. Steps alternate (ours, theirs, ours, ...) in one process so machine noise
hits both; the JSON reports median seconds per step, tokens/s and the ratio.

    .venv/bin/python benchmarks/train_step.py              # default: 10 timed steps each
    .venv/bin/python benchmarks/train_step.py --steps 3    # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from trustmoe.config import ModelConfig, TrainConfig  # noqa: E402
from trustmoe.model.fast import optimize_for_training  # noqa: E402
from trustmoe.model.hf import save_model  # noqa: E402
from trustmoe.model.transformer import Transformer  # noqa: E402
from trustmoe.train.optim import make_optimizer  # noqa: E402

SHAPES = [ROOT.parent / "shared" / "bench-shapes.json", Path("/work/shared/bench-shapes.json")]
LR, BETAS, WD = 1e-3, (0.9, 0.95), 0.1


def bench_config(shape: str) -> ModelConfig:
    for p in SHAPES:
        if p.exists():
            d = json.loads(p.read_text())[shape]
            return ModelConfig(**d)
    from trustmoe.config import get_preset

    return get_preset(shape).model


def build_pair(cfg: ModelConfig, seed: int) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """Our model and an HF Mixtral with identical weights; returns max |logit diff| too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ours.train()
    theirs.train()
    probe = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((ours(probe) - theirs(probe).logits).abs().max())
    return ours, theirs, diff


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def train_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one fwd + bwd (3x forward) step; both models do exactly these."""
    d, hd, L = cfg.hidden_size, cfg.head_size, cfg.num_hidden_layers
    proj = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    ffn = cfg.num_experts_per_tok * 3 * d * cfg.intermediate_size
    router = d * cfg.num_local_experts if cfg.is_moe else 0
    attn = cfg.num_attention_heads * hd * (seq + 1)  # QK^T and PV over the causal half
    macs_per_token = L * (proj + ffn + router + attn) + d * cfg.vocab_size
    return 3 * 2 * macs_per_token * batch * seq


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="bench-small", help="key of shared/bench-shapes.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave default)")
    ap.add_argument("--plain", action="store_true",
                    help="ours without optimize_for_training (plain lm_head + cross-entropy)")
    ap.add_argument("--device", default="cpu", help="cpu (the headline figure) or cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = bench_config(args.shape)
    ours, theirs, logit_diff = build_pair(cfg, args.seed)
    dev = torch.device(args.device)
    ours, theirs = ours.to(dev), theirs.to(dev)
    if not args.plain:
        ours = optimize_for_training(ours)
    tcfg = TrainConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, grad_clip=1.0)
    opt_ours = make_optimizer(ours, tcfg, dev.type)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=LR, betas=BETAS, weight_decay=WD,
                                   fused=True)

    g = torch.Generator().manual_seed(args.seed + 1)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(dev)
    idx, targets = batch[:, :-1], batch[:, 1:]

    def step_ours() -> float:
        out = ours.run(idx, targets=targets, return_stats=True)
        assert out.loss is not None and out.ce_loss is not None
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), tcfg.grad_clip)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return float(out.ce_loss.detach())

    def step_theirs() -> float:
        # HF shifts labels itself: labels = the unshifted batch gives the same next-token task
        out = theirs(input_ids=idx, labels=batch[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), tcfg.grad_clip)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    first_ours = step_ours()
    first_theirs = step_theirs()
    for _ in range(args.warmup - 1):
        step_ours()
        step_theirs()
    t_ours: list[float] = []
    t_theirs: list[float] = []
    for _ in range(args.steps):
        for fn, acc in ((step_ours, t_ours), (step_theirs, t_theirs)):
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            acc.append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    flops = train_flops(cfg, args.batch, args.seq)
    s_ours, s_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    result = {
        "benchmark": "train_step",
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": "float32",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fast_path": not args.plain,
        "cpu_allocator_tuned_for_both": not args.plain,
        "steps": args.steps,
        "initial_logit_max_abs_diff": logit_diff,
        "first_step_ce": {"trustmoe": first_ours, "transformers": first_theirs},
        "matmul_gflop_per_step": round(flops / 1e9, 1),
        "trustmoe": {"s_per_step": round(s_ours, 4), "tok_per_s": round(tokens / s_ours, 1),
                     "gflop_per_s": round(flops / s_ours / 1e9, 1)},
        "transformers": {"s_per_step": round(s_theirs, 4), "tok_per_s": round(tokens / s_theirs, 1),
                         "gflop_per_s": round(flops / s_theirs / 1e9, 1)},
        "speedup": round(s_theirs / s_ours, 3),
        "speedup_paired_median": round(
            statistics.median(b / a for a, b in zip(t_ours, t_theirs, strict=True)), 3),
        "min_s_per_step": {"trustmoe": round(min(t_ours), 4),
                           "transformers": round(min(t_theirs), 4)},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
