"""Quantization table: tokens/s, resident memory and validation perplexity for fp32/int8/int4.

Needs a trained model and its dataset (validation shard). Without --model/--data it builds a
dataset from the Python standard library with `trustmoe.data` and trains the `small` preset
briefly with `trustmoe.train` (a few minutes; pass --train-minutes to change it).

Perplexity is computed through the Engine itself (prompt log-probs of non-overlapping windows
of the validation shard), so it measures the quantized forward that serves requests.
Resident memory is measured in a fresh subprocess per format that loads the saved artifact
(fp32: the model dir; int8/int4: `save_quantized` output), as VmRSS growth over a baseline
taken after the libraries and kernels are paged in.
Decode tokens/s is batch-1 greedy, interleaved across formats round by round.

    python benchmarks/quantize.py --model runs/demo/model --data runs/demo/data
    python benchmarks/quantize.py --train-minutes 1 --val-tokens 4096    # quick, self-contained
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmoe.data.shards import open_tokens
from trustmoe.engine import Engine, SamplingParams
from trustmoe.engine.artifact import save_quantized

MODES: list[str | None] = [None, "int8", "int4"]

RSS_PROBE = """
import sys, torch
torch.set_num_threads(1)
from trustmoe.engine import Engine
import trustmoe.data.tokenizer, trustmoe.engine.artifact, trustmoe.model.hf
from trustmoe.engine.quantize import make_weight
x = torch.randn(2, 64)  # page in the BLAS and compile the CPU kernels before the baseline
for mode in (None, "int8", "int4"):
    make_weight(torch.randn(64, 64), mode, 32).mm(x)
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
base = rss()
e = Engine(sys.argv[1], kv_cache_mb=1, device='cpu')
print(rss() - base)
"""


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    if args.model and args.data:
        return Path(args.model), Path(args.data)
    from trustmoe.data.build import build_dataset
    from trustmoe.train import train

    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        print("building a stdlib dataset ...", file=sys.stderr)
        build_dataset(["stdlib"], data, progress=False)
    print(f"training preset small for {args.train_minutes} min ...", file=sys.stderr)
    res = train(data, work / "model", "small", max_minutes=args.train_minutes, progress=False,
                overrides={"eval_every": 10_000, "checkpoint_every": 10_000})
    return res.out_dir, data


def perplexity(eng: Engine, val: np.ndarray, window: int, limit: int) -> tuple[float, int]:
    nll, n = 0.0, 0
    prompts = [val[i: i + window].astype(np.int64).tolist()
               for i in range(0, min(len(val), limit) - window + 1, window)]
    res = eng.generate(prompts, params=SamplingParams(max_tokens=0, prompt_logprobs=0))
    for r in res:
        vals = [v for v in (r.prompt_logprobs or [])[1:] if v is not None]
        nll -= sum(vals)
        n += len(vals)
    return math.exp(nll / max(n, 1)), n


def decode_tok_s(eng: Engine, prompt: list[int], n: int) -> float:
    t = time.perf_counter()
    eng.generate([prompt], max_tokens=1, ignore_eos=True)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    r = eng.generate([prompt], max_tokens=n, ignore_eos=True)[0]
    return (len(r.token_ids) - 1) / max(time.perf_counter() - t - t_first, 1e-9)


def _weights_file(d: Path) -> Path:
    q = d / "model.quant.safetensors"
    return q if q.exists() else d / "model.safetensors"


def rss_bytes(model_dir: Path) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(model_dir)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained model directory")
    ap.add_argument("--data", help="dataset directory with val.bin")
    ap.add_argument("--train-minutes", type=float, default=1.5)
    ap.add_argument("--val-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens per timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data_dir = prepare(args, work)
        val = np.asarray(open_tokens(data_dir, "val"))
        engines = {str(m or "fp32"): Engine(model_dir, quantize=m, group_size=args.group_size,
                                            kv_cache_mb=64) for m in MODES}
        dirs = {"fp32": model_dir}
        for name in ("int8", "int4"):
            dirs[name] = save_quantized(engines[name].weights, work / f"model-{name}", model_dir,
                                        args.group_size)
        window = min(args.window, engines["fp32"].max_model_len)
        table: dict[str, dict[str, Any]] = {}
        for name, eng in engines.items():
            ppl, n = perplexity(eng, val, window, args.val_tokens)
            table[name] = {"val_perplexity": round(ppl, 4), "val_tokens_scored": n,
                           "weights_MB": round(eng.weights.nbytes / 1e6, 2),
                           "artifact_MB": round(_weights_file(dirs[name]).stat().st_size / 1e6, 2),
                           "resident_MB": round(rss_bytes(dirs[name]) / 1e6, 1)}
        prompt = val[: 32].astype(np.int64).tolist()
        speeds: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(args.rounds):
            for name, eng in engines.items():
                speeds[name].append(decode_tok_s(eng, prompt, args.tokens))
        base = table["fp32"]["val_perplexity"]
        fp_speed = statistics.median(speeds["fp32"])
        for name in engines:
            med = statistics.median(speeds[name])
            table[name]["decode_tok_s"] = round(med, 1)
            table[name]["speed_vs_fp32"] = round(med / fp_speed, 2)
            table[name]["perplexity_change_pct"] = round(
                100 * (table[name]["val_perplexity"] / base - 1), 3)
        print(json.dumps({
            "benchmark": "quantization", "model": str(args.model or "stdlib-trained small"),
            "threads": torch.get_num_threads(), "group_size": args.group_size,
            "targets": {"int8_ppl_change_pct_max": 1.0, "int4_ppl_change_pct_max": 5.0},
            "int8_kernel": "weight-only int8 per channel: compiled CPU kernels for decode rows, "
                           "dequantize + GEMM for prefill (fbgemm where the kernels are unavailable)",
            "int4_kernel": "group-wise asymmetric int4: compiled CPU kernels for decode rows, "
                           "dequantize + GEMM for prefill",
            "table": table,
        }, indent=2))


if __name__ == "__main__":
    main()
