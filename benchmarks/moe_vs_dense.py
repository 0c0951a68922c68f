"""MoE preset vs its dense twin, trained on the same tokens for the same wall-clock time.

Both models see batches from the same seed (so the same token stream, in the same order);
each trains for --minutes of wall-clock; the script prints both validation losses as JSON.
The dense twin has the same active FFN parameters per token (intermediate = k * expert width).

    python benchmarks/moe_vs_dense.py --data runs/demo/data --preset small --minutes 3
    python benchmarks/moe_vs_dense.py --quick        # builds a small stdlib dataset first
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from trustmoe.config import get_preset
from trustmoe.train import train


def ensure_data(data: Path | None, workdir: Path) -> Path:
    if data is not None:
        return data
    from trustmoe.data.build import build_dataset

    out = workdir / "data"
    build_dataset(["stdlib"], out, progress=False)
    return out


def run(preset: str, data: Path, minutes: float, workdir: Path, seed: int) -> dict[str, object]:
    cfg = get_preset(preset).model
    res = train(data, workdir / preset, preset, max_minutes=minutes, progress=False,
                overrides={"seed": seed, "eval_every": 10_000, "checkpoint_every": 10_000})
    return {
        "preset": preset,
        "total_params": cfg.num_parameters(),
        "active_params_per_token": cfg.num_parameters(active=True),
        "steps": res.steps,
        "tokens": res.tokens,
        "tokens_per_s": round(res.tokens_per_second, 1),
        "val_loss": round(res.val_loss or float("nan"), 4),
        "val_perplexity": round(res.val_perplexity or float("nan"), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="dataset dir (default: build stdlib)")
    ap.add_argument("--preset", default="small", help="MoE preset; its twin is PRESET-dense")
    ap.add_argument("--minutes", type=float, default=3.0, help="wall-clock per model")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--quick", action="store_true", help="1 minute per model")
    args = ap.parse_args()
    minutes = 1.0 if args.quick else args.minutes
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = ensure_data(args.data, work)
        t0 = time.time()
        moe = run(args.preset, data, minutes, work, args.seed)
        dense = run(f"{args.preset}-dense", data, minutes, work, args.seed)
    result = {
        "benchmark": "moe_vs_dense",
        "minutes_per_model": minutes,
        "moe": moe,
        "dense": dense,
        "val_loss_delta_dense_minus_moe": round(float(dense["val_loss"]) - float(moe["val_loss"]), 4),
        "moe_wins": float(moe["val_loss"]) < float(dense["val_loss"]),
        "wall_s": round(time.time() - t0, 1),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
