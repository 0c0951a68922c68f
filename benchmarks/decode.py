"""Batch-1 decode speed: trustmoe Engine vs `transformers` generate on the same weights.

For each shape in shared/bench-shapes.json (random weights, saved once as an HF directory that
both load), measures greedy batch-1 decode tokens/s of
  - transformers `generate` (KV cache on, greedy, exactly --tokens new tokens),
  - our Engine in fp32, and with int8 weights (and int4 with --int4),
interleaved round by round in one process so machine noise hits both alike, plus the machine's
memory read bandwidth (a large tensor reduction, same threads) measured in the same rounds.
Bandwidth utilisation = active weight bytes per token x tokens/s / read bandwidth.
llama.cpp is compared only where `llama_cpp` is importable (otherwise reported as skipped).

    python benchmarks/decode.py                       # both shapes, ~2-3 minutes
    python benchmarks/decode.py --shapes bench-small --tokens 32 --rounds 2   # quick
    python benchmarks/decode.py --threads 1      # on a busy machine (see below)

On a 2-core machine that is also running other work, OpenMP's spinning threads can make
every contender (ours and transformers) ~5x slower with 2 threads; use --threads 1 or
OMP_WAIT_POLICY=PASSIVE there, and compare only figures from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _roofline import active_weight_bytes, read_bandwidth

from trustmoe.config import ModelConfig
from trustmoe.engine import Engine, SamplingParams
from trustmoe.model import Transformer, save_model

SHAPES = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench-shapes.json"


def load_shapes(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():  # fall back to the presets that mirror the file
        from trustmoe.config import get_preset

        return {n: get_preset(n).model.to_dict() for n in ("bench-small", "bench-medium")}
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def time_engine(eng: Engine, prompt: list[int], n: int) -> float:
    sp = SamplingParams(max_tokens=n, ignore_eos=True)
    t = time.perf_counter()
    eng.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True), "warm")
    while eng.has_unfinished():
        eng.step()
    t_prefill = time.perf_counter() - t  # prefill + first token, excluded below
    t = time.perf_counter()
    r = eng.generate([prompt], params=sp)[0]
    dt = time.perf_counter() - t - t_prefill
    return (len(r.token_ids) - 1) / max(dt, 1e-9)


def time_hf(hf: Any, prompt: list[int], n: int) -> float:
    x = torch.tensor([prompt], device=hf.device)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        dt = time.perf_counter() - t - t_prefill
    return (out.shape[1] - len(prompt) - 1) / max(dt, 1e-9)


def bench_shape(name: str, shape: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig.from_dict(shape)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d).eval().to(args.device)
        kw: dict[str, Any] = {"kv_cache_mb": 64, "device": args.device}
        engines = {"fp32": Engine(d, **kw), "int8": Engine(d, quantize="int8", **kw)}
        if args.int4:
            engines["int4"] = Engine(d, quantize="int4", **kw)
    del model
    buf = torch.ones(args.bw_mb * 2**20 // 4, device=args.device)
    res: dict[str, list[float]] = {k: [] for k in [*engines, "transformers", "read_bw"]}
    for _ in range(args.rounds):  # interleaved: every contender once per round
        res["read_bw"].append(read_bandwidth(buf))
        res["transformers"].append(time_hf(hf, prompt, args.tokens))
        for k, eng in engines.items():
            res[k].append(time_engine(eng, prompt, args.tokens))
    med = {k: statistics.median(v) for k, v in res.items()}
    bw = med["read_bw"]
    fp_bytes = active_weight_bytes(cfg)
    int8_bytes = sum(w.nbytes for w in engines["int8"].weights.all_weights()) / \
        sum(w.nbytes for w in engines["fp32"].weights.all_weights()) * fp_bytes
    out: dict[str, Any] = {
        "shape": name,
        "tokens": args.tokens, "prompt": args.prompt, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "device": args.device,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "tok_s": {k: round(v, 1) for k, v in med.items() if k != "read_bw"},
        "tok_s_all_rounds": {k: [round(x, 1) for x in v] for k, v in res.items()
                             if k != "read_bw"},
        "read_bandwidth_GBps": round(bw / 1e9, 2),
        "active_weight_MB_per_token_fp32": round(fp_bytes / 1e6, 1),
        "bandwidth_utilisation_fp32": round(fp_bytes * med["fp32"] / bw, 3),
        # each round's decode against the bandwidth measured in that same round (the machine's
        # bandwidth drifts on a shared host; the median pairs like with like)
        "bandwidth_utilisation_fp32_per_round": [
            round(fp_bytes * t / b, 3) for t, b in zip(res["fp32"], res["read_bw"], strict=True)],
        "bandwidth_utilisation_fp32_median_of_rounds": round(statistics.median(
            fp_bytes * t / b for t, b in zip(res["fp32"], res["read_bw"], strict=True)), 3),
        "bandwidth_utilisation_transformers": round(fp_bytes * med["transformers"] / bw, 3),
        "approx_weight_MB_per_token_int8": round(int8_bytes / 1e6, 1),
        "ratio_fp32_vs_transformers": round(med["fp32"] / med["transformers"], 2),
        "ratio_int8_vs_fp32": round(med["int8"] / med["fp32"], 2),
        "kernels": kernel_note(args.device),
        "fast_decode": engines["fp32"].runner.fast is not None,
        "batch_invariant_group_rows": engines["fp32"].runner.group_rows,
    }
    if "int4" in med:
        out["ratio_int4_vs_fp32"] = round(med["int4"] / med["fp32"], 2)
    out["llama_cpp"] = llama_cpp_note()
    return out


def kernel_note(device: str) -> str:
    from trustmoe.engine import cpu_kernels

    if device != "cpu":
        return "torch matmuls (int8/int4 dequantized per call)"
    if not cpu_kernels.available():
        return "torch/MKL matmuls; int8 through fbgemm (compiled CPU kernels unavailable)"
    return ("compiled CPU kernels: decode rows through whole-block C (fp32, weight-only int8, "
            "int4), prefill through MKL")


def llama_cpp_note() -> str:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "skipped: llama-cpp-python is not installed (building it takes ~8 min on 2 cores)"
    return "see benchmarks/vs_llama_cpp.py for the side-by-side run"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["bench-small", "bench-medium"])
    ap.add_argument("--shapes-file", type=Path, default=SHAPES)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per timed generate")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    ap.add_argument("--bw-mb", type=int, default=512, help="buffer size for the bandwidth probe")
    ap.add_argument("--int4", action="store_true", help="also time int4 weights")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="cpu", help="cpu (the target) or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = load_shapes(args.shapes_file)
    results = [bench_shape(n, shapes[n], args) for n in args.shapes]
    print(json.dumps({"benchmark": "decode_batch1", "results": results}, indent=2))


if __name__ == "__main__":
    main()
