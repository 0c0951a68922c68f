"""Side by side with llama.cpp: the same greedy decode on our GGUF export, in one process.

For each shape in shared/bench-shapes.json (random weights, byte-level BPE tokenizer, saved
as an HF directory), exports GGUF with `trustmoe export gguf` (f32 and q8_0), loads both files
with llama.cpp through `llama-cpp-python`'s low-level API, and measures, interleaved round by
round so machine noise hits every contender alike:

  - batch 1: greedy decode tokens/s (prefill and first token excluded, exactly --tokens new
    tokens, EOS ignored) of our Engine fp32 vs llama.cpp on the f32 GGUF, and our Engine int8
    vs llama.cpp on the q8_0 GGUF;
  - 16 concurrent requests: total generated tokens / wall time (prefill included) of our
    Engine.generate with 16 prompts (continuous batching) vs llama.cpp decoding the same 16
    sequences together (one `llama_batch` with 16 seq_ids per `llama_decode`, non-unified
    KV cache), and vs llama.cpp running the 16 requests one after another (what
    llama-cpp-python's own server does with one slot);
  - prefill of one --prefill-token prompt (512): prompt tokens/s of our Engine (batch-invariant,
    the default, and not) up to its first token vs llama.cpp's one `llama_decode` of it;
  - decode at 32, 512 and 2,048 tokens of context (within the shape's limit): tokens/s of
    both over 64 new tokens, and the share each keeps from 32 to the longest, ours also with
    an fp16 KV cache (`kv_cache_dtype="float16"`, llama.cpp's default cache precision, so the
    like-for-like figure); the share is also taken round by round (both contexts measured
    seconds apart) and ours over llama.cpp's given as the median of those rounds, which the
    host's bandwidth drift between rounds does not move;
  - beside every figure (`*_roofline`): the GB/s of weights and KV cache and the GFLOP/s it
    implies, as shares of the read bandwidth and GEMM peak measured in the same run;
  - greedy token agreement of llama.cpp on the f32 GGUF (default f16 KV cache, and f32 KV
    cache without flash attention) with our Engine fp32, plus the largest logit difference
    after the prompt between llama.cpp (f32 KV) and our plain model forward.

`--parts` picks figures (batch1, concurrent, prefill, scaling).

llama.cpp is driven with `llama_decode` on raw contexts made from llama.cpp's own default
context parameters (so flash attention "auto" and an f16 KV cache, as `llama-cli` uses);
the next token is numpy's argmax over `llama_get_logits_ith`, so no sampler chain and no EOS
stop gets in the way. Our engine's prefix caching is off, so repeated rounds re-run prefill.

llama-cpp-python is not a project dependency (it compiles llama.cpp from source, ~8-10
minutes on 2 cores); install it into a separate benchmark environment:

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch -e '.[all]'
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/bench-venv/bin/pip install llama-cpp-python
    /work/bench-venv/bin/python benchmarks/vs_llama_cpp.py --rounds 3          # ~3-4 minutes
    /work/bench-venv/bin/python benchmarks/vs_llama_cpp.py --shapes bench-small --tokens 32 --rounds 1

Without `llama_cpp` importable it prints a JSON saying it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHAPES = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench-shapes.json"
CONCURRENT = 16
AGREE_TOKENS = 16
CONTEXTS = (32, 512, 2048)  # decode-at-context scaling
SCALING_TOKENS = 64  # decoded at each context (16 left ~15 ms a measurement: noise-dominated)
PARTS = ("batch1", "concurrent", "prefill", "scaling")


def load_shapes(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():  # fall back to the presets that mirror the file
        from trustmoe.config import get_preset

        return {n: get_preset(n).model.to_dict() for n in ("bench-small", "bench-medium")}
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def build_model_dir(out: Path, shape: dict[str, Any], seed: int = 0) -> Any:
    """Random weights plus a byte-level BPE tokenizer padded to the vocab (GGUF needs one)."""
    from _models import write_random_model

    from trustmoe.config import ModelConfig

    return write_random_model(out, ModelConfig.from_dict(shape), seed)


def export(model_dir: Path, out: Path, quant: str) -> dict[str, Any]:
    """`trustmoe export gguf` exactly as a user runs it."""
    cmd = [sys.executable, "-m", "trustmoe.cli", "export", "gguf", str(model_dir), str(out),
           "--quantize", quant, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"export failed ({r.returncode}): {r.stderr[-2000:]}")
    info: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return info


def ours_greedy(eng: Any, prompt: list[int], n: int) -> tuple[list[int], float]:
    """(n greedy tokens, decode tok/s from the first token to the last), as for llama.cpp."""
    from trustmoe.engine import SamplingParams

    rid = eng.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    t_first = t_end = 0.0
    toks: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id != rid:
                continue
            if not t_first and o.new_token_ids:
                t_first = time.perf_counter()
            if o.finished:
                t_end, toks = time.perf_counter(), list(o.token_ids)
    return toks, (len(toks) - 1) / max(t_end - t_first, 1e-9)


def ours_concurrent(eng: Any, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    from trustmoe.engine import SamplingParams

    t0 = time.perf_counter()
    res = eng.generate(prompts, params=SamplingParams(max_tokens=n, ignore_eos=True))
    dt = time.perf_counter() - t0
    return [list(r.token_ids) for r in res], sum(len(r.token_ids) for r in res) / dt


def agreement(a: list[int], b: list[int], k: int = AGREE_TOKENS) -> dict[str, Any]:
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return {f"first_{k}_match": a[:k] == b[:k], "first_divergence": first,
            "agree_fraction": round(sum(x == y for x, y in zip(a, b, strict=False)) / max(len(a), 1), 3)}


def ours_prefill(eng: Any, prompt: list[int]) -> float:
    """Prompt tokens/s: the request's prefill and its first token (prefix caching is off)."""
    from trustmoe.engine import SamplingParams

    t0 = time.perf_counter()
    eng.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    return len(prompt) / (time.perf_counter() - t0)


def contexts_for(cfg: Any) -> list[int]:
    return [c for c in CONTEXTS if c <= cfg.max_position_embeddings]


def rounds(args: argparse.Namespace, jobs: dict[str, Callable[[], tuple[Any, float]]],
           ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Every job once per round, in order, round after round: (tok/s per round, last outputs)."""
    rates: dict[str, list[float]] = {k: [] for k in jobs}
    last: dict[str, Any] = {}
    for _ in range(args.rounds):
        for k, job in jobs.items():
            last[k], r = job()
            rates[k].append(r)
    return rates, last


def bench_shape(name: str, shape: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from _llama_cpp import LlamaCpp
    from _roofline import (
        active_weight_bytes,
        flops_per_token,
        gemm_peak,
        kv_bytes,
        read_bandwidth,
        step_weight_bytes,
        utilisation,
    )

    from trustmoe.engine import Engine
    from trustmoe.model import load

    gen = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model"
        cfg = build_model_dir(d, shape)

        def rand_prompt(n: int) -> list[int]:
            return torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist()

        prompts = [rand_prompt(args.prompt) for _ in range(CONCURRENT)]
        prompt, long_prompt = prompts[0], rand_prompt(args.prefill)
        ctx_prompts = {c: rand_prompt(max(1, c - SCALING_TOKENS)) for c in contexts_for(cfg)}
        files = {q: export(d, Path(tmp) / f"{name}-{q}.gguf", q) for q in ("f32", "q8_0")}
        kw: dict[str, Any] = {"kv_cache_mb": 256, "max_num_seqs": 32, "enable_prefix_caching": False}
        ours = {"fp32": Engine(d, **kw), "int8": Engine(d, quantize="int8", **kw)}
        free = {"fp32": Engine(d, batch_invariant=False, **kw),
                "int8": Engine(d, quantize="int8", batch_invariant=False, **kw)}
        kv16 = {"fp32": Engine(d, kv_cache_dtype="float16", **kw),  # llama.cpp's cache precision
                "int8": Engine(d, quantize="int8", kv_cache_dtype="float16", **kw)}
        ctx_per_seq = -(-(args.prompt + args.tokens) // 256) * 256
        peers = {q: LlamaCpp(Path(f["path"]), args.threads, ctx_per_seq,
                             max(CONCURRENT * args.prompt, args.prefill, max(CONTEXTS)))
                 for q, f in files.items()}
        pairs = {"fp32_vs_f32": ("fp32", "f32"), "int8_vs_q8_0": ("int8", "q8_0")}
        with torch.no_grad():
            ref = load(d)(torch.tensor([prompt]))[0, -1].numpy()
        ref_max_abs = float(np.abs(ref).max())
        logit_diff = float(np.abs(peers["f32"].prompt_logits(prompt) - ref).max())
        f32kv_toks, _ = peers["f32"].greedy(prompt, AGREE_TOKENS, f32_kv=True)
        bw_buf = torch.ones(args.bw_mb * 2**20 // 4)  # far larger than the caches
        bw, peaks = read_bandwidth(bw_buf), gemm_peak()

        for eng in [*ours.values(), *free.values(), *kv16.values()]:  # warm-up: first calls
            ours_greedy(eng, prompt, 4)
            ours_concurrent(eng, prompts, 2)
            ours_prefill(eng, long_prompt)
        for p in peers.values():
            p.greedy(prompt, 4)
            p.batched(prompts, 2)
            p.prefill(long_prompt)

        one: dict[str, Callable[[], tuple[Any, float]]] = {}
        many: dict[str, Callable[[], tuple[Any, float]]] = {}
        pre: dict[str, Callable[[], tuple[Any, float]]] = {}
        scale: dict[str, Callable[[], tuple[Any, float]]] = {}
        for ok, pk in pairs.values():  # ours then llama.cpp, per precision
            one[ok] = partial(ours_greedy, ours[ok], prompt, args.tokens)
            one[pk] = partial(peers[pk].greedy, prompt, args.tokens)
            many[ok] = partial(ours_concurrent, ours[ok], prompts, args.tokens)
            many[pk] = partial(peers[pk].batched, prompts, args.tokens)
            pre[ok] = partial(lambda e: (None, ours_prefill(e, long_prompt)), ours[ok])
            pre[ok + "_not_invariant"] = partial(lambda e: (None, ours_prefill(e, long_prompt)), free[ok])
            pre[pk] = partial(lambda pp: (None, pp.prefill(long_prompt)), peers[pk])
            for c, cp in ctx_prompts.items():
                scale[f"{ok}@{c}"] = partial(ours_greedy, ours[ok], cp, SCALING_TOKENS)
                scale[f"{ok}_kv16@{c}"] = partial(ours_greedy, kv16[ok], cp, SCALING_TOKENS)
                scale[f"{pk}@{c}"] = partial(peers[pk].greedy, cp, SCALING_TOKENS, False,
                                             min(-(-(c + 1) // 256) * 256, cfg.max_position_embeddings))
        parts = set(args.parts)
        b1, toks = rounds(args, one if "batch1" in parts else {})
        cc, btoks = rounds(args, many if "concurrent" in parts else {})
        pf, _ = rounds(args, pre if "prefill" in parts else {})
        sc, _ = rounds(args, scale if "scaling" in parts else {})
        seq: dict[str, list[float]] = {k: [] for k in peers}
        if not args.no_sequential and "concurrent" in parts:
            for _ in range(args.rounds):
                for k, p in peers.items():
                    seq[k].append(p.sequential(prompts, args.tokens))
        bw, peak = max(bw, read_bandwidth(bw_buf)), max(peaks.values())
        del bw_buf
        info_ctx = peers["f32"].params
        for p in peers.values():
            p.close()

    def med(d: dict[str, list[float]]) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in d.items() if v}

    med1, medc, medp, meds, medsc = med(b1), med(cc), med(pf), med(seq), med(sc)
    bpp = {"fp32": 4.0, "f32": 4.0, "int8": 1.0, "q8_0": 34 / 32,  # weight bytes per parameter
           "fp32_kv16": 4.0, "int8_kv16": 1.0}
    kvb = {"fp32": 4.0, "int8": 4.0, "f32": 2.0, "q8_0": 2.0,  # KV bytes per value (llama: f16)
           "fp32_kv16": 2.0, "int8_kv16": 2.0}
    ctx1 = args.prompt + args.tokens / 2

    def util(k: str, tok_s: float, context: float, rows: int = 1, lm_head: bool = True) -> dict[str, float]:
        wb = step_weight_bytes(cfg, rows, bpp[k]) / rows + kv_bytes(cfg, context, kvb[k])
        return utilisation(tok_s, wb, flops_per_token(cfg, context, lm_head), bw, peak)

    def ratios(m: dict[str, float], suffix: str = "") -> dict[str, float]:
        return {n + suffix: round(m[o + suffix] / m[p], 3) for n, (o, p) in pairs.items()}

    def rounded(m: dict[str, float] | dict[str, list[float]]) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) else [round(x, 1) for x in v]
                for k, v in m.items()}

    out: dict[str, Any] = {
        "shape": name, "tokens": args.tokens, "prompt": args.prompt, "rounds": args.rounds,
        "threads": args.threads, "torch_threads": torch.get_num_threads(),
        "gguf_bytes": {q: f["bytes"] for q, f in files.items()},
        "machine": {"read_bandwidth_GBps": round(bw / 1e9, 2), "gemm_peak_GFLOPs": peak,
                    "active_weight_MB_fp32": round(active_weight_bytes(cfg) / 1e6, 1)},
    }
    if med1:
        out.update({
            "batch1_tok_s": rounded(med1), "batch1_tok_s_all_rounds": rounded(b1),
            "batch1_ratio_ours_over_llama_cpp": ratios(med1),
            "batch1_roofline": {k: util(k, v, ctx1) for k, v in med1.items()}})
    if medc:
        out.update({
            "concurrent16_total_tok_s": rounded(medc), "concurrent16_total_tok_s_all_rounds": rounded(cc),
            "concurrent16_ratio_ours_over_llama_cpp_batched": ratios(medc),
            "concurrent16_roofline": {k: util(k, v, ctx1, CONCURRENT) for k, v in medc.items()}})
    if meds:
        out["concurrent16_llama_cpp_sequential_tok_s"] = rounded(meds)
        out["concurrent16_ratio_ours_over_llama_cpp_sequential"] = {
            n: round(medc[o] / meds[p], 3) for n, (o, p) in pairs.items()}
    if medp:
        P = args.prefill
        out.update({
            f"prefill{P}_tok_s": rounded(medp), f"prefill{P}_tok_s_all_rounds": rounded(pf),
            f"prefill{P}_ratio_ours_over_llama_cpp": {**ratios(medp), **ratios(medp, "_not_invariant")},
            f"prefill{P}_roofline": {k: util(k.split("_not")[0], v, P / 2, P, lm_head=False)
                                     for k, v in medp.items()}})
    if medsc:
        ctxs = list(ctx_prompts)
        kept = {k: round(medsc[f"{k}@{ctxs[-1]}"] / medsc[f"{k}@{ctxs[0]}"], 3)
                for k in [*ours, *(k + "_kv16" for k in ours), *peers]}
        out.update({
            "context_scaling_decode_tok_s": rounded(medsc),
            "context_scaling_roofline": {k: util(k.split("@")[0], v, int(k.split("@")[1]))
                                         for k, v in medsc.items()},
            f"context_scaling_kept_{ctxs[-1]}_over_{ctxs[0]}": kept,
            "context_scaling_ours_kept_over_llama_cpp_kept": {
                n: round(kept[o] / kept[p], 3) for n, (o, p) in pairs.items()},
            "context_scaling_ours_fp16_cache_kept_over_llama_cpp_kept": {
                n: round(kept[o + "_kv16"] / kept[p], 3) for n, (o, p) in pairs.items()}})

        def per_round(k: str) -> list[float]:  # kept share of each round: both contexts
            # measured seconds apart, so the host's drift between rounds cancels
            return [a / b for a, b in zip(sc[f"{k}@{ctxs[-1]}"], sc[f"{k}@{ctxs[0]}"], strict=True)]

        kr = {k: per_round(k) for k in kept}
        out.update({
            "context_scaling_kept_per_round": {k: [round(x, 3) for x in v] for k, v in kr.items()},
            "context_scaling_ours_kept_over_llama_cpp_kept_median_of_rounds": {
                n + sfx: round(statistics.median(a / b for a, b in zip(kr[o + sfx], kr[p], strict=True)), 3)
                for n, (o, p) in pairs.items() for sfx in ("", "_kv16")}})
    agree: dict[str, Any] = {
        "llama_cpp_f32_f32kv_vs_ours_model_prompt_logits_max_abs_diff": round(logit_diff, 6),
        "prompt_logits_max_abs": round(ref_max_abs, 3)}
    if toks:
        agree.update({
            "llama_cpp_f32_f16kv_vs_ours_fp32": agreement(toks["f32"], toks["fp32"]),
            "llama_cpp_f32_f32kv_vs_ours_fp32": agreement(f32kv_toks, toks["fp32"][:AGREE_TOKENS]),
            "llama_cpp_q8_0_vs_ours_int8": agreement(toks["q8_0"], toks["int8"]),
            "ours_fp32_first_tokens": toks["fp32"][:AGREE_TOKENS],
            "llama_cpp_f32_first_tokens": toks["f32"][:AGREE_TOKENS]})
    if toks and btoks:
        agree.update({
            "llama_cpp_batched_vs_single_f32": agreement(btoks["f32"][0], toks["f32"]),
            "ours_batched_vs_single_fp32": agreement(btoks["fp32"][0], toks["fp32"]),
            "concurrent16_sequences_first_16_match_f32_vs_fp32": sum(
                a[:AGREE_TOKENS] == b[:AGREE_TOKENS] for a, b in zip(btoks["f32"], btoks["fp32"], strict=True)),
            "concurrent16_sequences_first_16_match_q8_0_vs_int8": sum(
                a[:AGREE_TOKENS] == b[:AGREE_TOKENS] for a, b in zip(btoks["q8_0"], btoks["int8"], strict=True))})
    out["agreement"] = agree
    out["llama_cpp_context"] = info_ctx
    return out


def system_info(llama_cpp: Any) -> str | None:
    try:
        info = llama_cpp.llama_print_system_info()
    except Exception:  # older or newer bindings: the figure does not depend on it
        return None
    return (info.decode() if isinstance(info, bytes) else str(info)).strip()


def git_state() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes (an editable install runs them)."""
    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "src_dirty": bool(git("status", "--porcelain", "src"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["bench-small", "bench-medium"])
    ap.add_argument("--shapes-file", type=Path, default=SHAPES)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length")
    ap.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill figure")
    ap.add_argument("--bw-mb", type=int, default=512, help="buffer size of the bandwidth probe")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both (torch intra-op and llama.cpp n_threads)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                    help="figures to measure (all by default)")
    ap.add_argument("--no-sequential", action="store_true",
                    help="skip llama.cpp running the 16 requests one after another")
    args = ap.parse_args()
    if args.tokens < 2 or min(args.prompt, args.prefill, args.rounds, args.threads) < 1:
        ap.error("--tokens must be >= 2 and --prompt, --prefill, --rounds, --threads >= 1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _llama_cpp import import_llama_cpp

    try:
        llama_cpp = import_llama_cpp()
    except ImportError:
        print(json.dumps({"benchmark": "llama_cpp_side_by_side", "skipped": True,
                          "reason": "llama-cpp-python is not installed (see this script's docstring)"},
                         indent=2))
        return
    torch.set_num_threads(args.threads)
    shapes = load_shapes(args.shapes_file)
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = [bench_shape(n, shapes[n], args) for n in args.shapes]
    print(json.dumps({
        "benchmark": "llama_cpp_side_by_side",
        "llama_cpp_python": getattr(llama_cpp, "__version__", None),
        "llama_cpp_system_info": system_info(llama_cpp),
        "torch": torch.__version__,
        "trustmoe_git": git_state(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_before_after": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "concurrent16_llama_cpp_mode": (
            "batched: one llama_batch holding all 16 sequences (seq_id 0..15) per llama_decode, "
            "context n_seq_max=16, llama.cpp's default non-unified KV cache; "
            "'sequential' figures run the 16 requests one after another on one sequence"),
        "concurrent16_ours_mode": "Engine.generate with 16 prompts in one call (continuous batching)",
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
