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
  - greedy token agreement of llama.cpp on the f32 GGUF (default f16 KV cache, and f32 KV
    cache without flash attention) with our Engine fp32, plus the largest logit difference
    after the prompt between llama.cpp (f32 KV) and our plain model forward.

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
GGML_TYPE_F32 = 0


def import_llama_cpp() -> Any:
    """The `llama_cpp` package (llama-cpp-python); ImportError where it is not installed."""
    import llama_cpp

    return llama_cpp


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


class LlamaCpp:
    """One GGUF file in llama.cpp; greedy decode through `llama_decode` on raw contexts."""

    def __init__(self, path: Path, threads: int, ctx_per_seq: int, max_batch: int) -> None:
        llama_cpp = import_llama_cpp()
        self.lc = llama_cpp
        # Llama() loads the model quietly; its own context stays unused (kept tiny)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=64, n_ubatch=64,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.model = self.llm._model.model
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.threads, self.ctx_per_seq, self.max_batch = threads, ctx_per_seq, max_batch
        self._ctxs: dict[tuple[int, bool], Any] = {}
        self.params: dict[str, Any] = {}
        self.batch = llama_cpp.llama_batch_init(max_batch, 0, 1)

    def ctx(self, n_seq: int, f32_kv: bool = False) -> Any:
        key = (n_seq, f32_kv)
        if key not in self._ctxs:
            p = self.lc.llama_context_default_params()
            p.n_ctx = n_seq * self.ctx_per_seq
            p.n_batch = max(int(p.n_batch), self.max_batch)  # the 16 prompts go in one llama_decode
            p.n_seq_max = n_seq
            p.n_threads = p.n_threads_batch = self.threads
            if f32_kv:
                p.type_k = p.type_v = GGML_TYPE_F32
                p.flash_attn_type = self.lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            c = self.lc.llama_init_from_model(self.model, p)
            if not c:
                raise RuntimeError(f"llama.cpp could not make a context for {n_seq} sequences")
            self._ctxs[key] = c
            if not f32_kv:
                self.params = {"flash_attn_type": int(p.flash_attn_type), "type_k": int(p.type_k),
                               "type_v": int(p.type_v), "kv_unified": bool(p.kv_unified),
                               "n_batch": int(p.n_batch), "n_ubatch": int(p.n_ubatch),
                               "n_ctx_per_seq": self.ctx_per_seq}
        return self._ctxs[key]

    def _decode(self, ctx: Any, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, pos, seq, want logits) -> argmax token of each row that wants logits."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (t, p, s, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, int(out)
            b.seq_id[i][0] = s
        rc = self.lc.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return [int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())
                for i, it in enumerate(items) if it[3]]

    def _clear(self, ctx: Any) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)

    def greedy(self, prompt: list[int], n: int, f32_kv: bool = False) -> tuple[list[int], float]:
        """(n greedy tokens, decode tok/s excluding prefill and the first token)."""
        ctx = self.ctx(1, f32_kv)
        self._clear(ctx)
        P = len(prompt)
        out = self._decode(ctx, [(t, i, 0, i == P - 1) for i, t in enumerate(prompt)])
        t0 = time.perf_counter()
        for k in range(n - 1):
            out += self._decode(ctx, [(out[-1], P + k, 0, True)])
        dt = time.perf_counter() - t0
        return out, (n - 1) / max(dt, 1e-9)

    def prompt_logits(self, prompt: list[int]) -> np.ndarray:
        """Logits after the prompt, f32 KV cache, no flash attention."""
        ctx = self.ctx(1, True)
        self._clear(ctx)
        self._decode(ctx, [(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        ptr = self.lc.llama_get_logits_ith(ctx, len(prompt) - 1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def batched(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
        """All prompts decoded together (one llama_batch, a seq_id each): (tokens, total tok/s)."""
        ctx = self.ctx(len(prompts))
        self._clear(ctx)
        t0 = time.perf_counter()
        items = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        outs = [[t] for t in self._decode(ctx, items)]
        for k in range(n - 1):
            nxt = self._decode(ctx, [(o[-1], len(p) + k, s, True)
                                     for s, (p, o) in enumerate(zip(prompts, outs, strict=True))])
            for o, t in zip(outs, nxt, strict=True):
                o.append(t)
        dt = time.perf_counter() - t0
        return outs, len(prompts) * n / dt

    def sequential(self, prompts: list[list[int]], n: int) -> float:
        """The requests one after another on one sequence: total tok/s (prefill included)."""
        ctx = self.ctx(1)
        t0 = time.perf_counter()
        for p in prompts:
            self._clear(ctx)
            out = self._decode(ctx, [(t, i, 0, i == len(p) - 1) for i, t in enumerate(p)])
            for k in range(n - 1):
                out += self._decode(ctx, [(out[-1], len(p) + k, 0, True)])
        return len(prompts) * n / (time.perf_counter() - t0)

    def close(self) -> None:
        for c in self._ctxs.values():
            self.lc.llama_free(c)
        self._ctxs.clear()
        self.lc.llama_batch_free(self.batch)
        self.llm.close()


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


def bench_shape(name: str, shape: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from trustmoe.engine import Engine
    from trustmoe.model import load

    gen = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model"
        cfg = build_model_dir(d, shape)
        prompts = [torch.randint(3, cfg.vocab_size, (args.prompt,), generator=gen).tolist()
                   for _ in range(CONCURRENT)]
        prompt = prompts[0]
        files = {q: export(d, Path(tmp) / f"{name}-{q}.gguf", q) for q in ("f32", "q8_0")}
        kw: dict[str, Any] = {"kv_cache_mb": 256, "max_num_seqs": 32, "enable_prefix_caching": False}
        ours = {"fp32": Engine(d, **kw), "int8": Engine(d, quantize="int8", **kw)}
        ctx_per_seq = -(-(args.prompt + args.tokens) // 256) * 256
        peers = {q: LlamaCpp(Path(f["path"]), args.threads, ctx_per_seq, CONCURRENT * args.prompt)
                 for q, f in files.items()}
        pairs = {"fp32_vs_f32": ("fp32", "f32"), "int8_vs_q8_0": ("int8", "q8_0")}
        with torch.no_grad():
            ref = load(d)(torch.tensor([prompt]))[0, -1].numpy()
        ref_max_abs = float(np.abs(ref).max())
        logit_diff = float(np.abs(peers["f32"].prompt_logits(prompt) - ref).max())
        f32kv_toks, _ = peers["f32"].greedy(prompt, AGREE_TOKENS, f32_kv=True)

        for eng in ours.values():  # warm-up: first-call allocations, kernel selection
            ours_greedy(eng, prompt, 4)
            ours_concurrent(eng, prompts, 2)
        for p in peers.values():
            p.greedy(prompt, 4)
            p.batched(prompts, 2)

        b1: dict[str, list[float]] = {k: [] for k in [*ours, *peers]}
        cc: dict[str, list[float]] = {k: [] for k in [*ours, *peers]}
        seq: dict[str, list[float]] = {k: [] for k in peers}
        toks: dict[str, list[int]] = {}
        btoks: dict[str, list[list[int]]] = {}
        order: list[tuple[str, Callable[[], tuple[Any, float]], Callable[[], tuple[Any, float]]]] = []
        for ok, pk in pairs.values():  # ours then llama.cpp, per precision
            order.append((ok, partial(ours_greedy, ours[ok], prompt, args.tokens),
                          partial(ours_concurrent, ours[ok], prompts, args.tokens)))
            order.append((pk, partial(peers[pk].greedy, prompt, args.tokens),
                          partial(peers[pk].batched, prompts, args.tokens)))
        for _ in range(args.rounds):
            for k, one, _many in order:
                toks[k], r = one()
                b1[k].append(r)
            for k, _one, many in order:
                btoks[k], r = many()
                cc[k].append(r)
            if not args.no_sequential:
                for k, p in peers.items():
                    seq[k].append(p.sequential(prompts, args.tokens))
        info_ctx = peers["f32"].params
        for p in peers.values():
            p.close()

    med1 = {k: statistics.median(v) for k, v in b1.items()}
    medc = {k: statistics.median(v) for k, v in cc.items()}
    meds = {k: statistics.median(v) for k, v in seq.items() if v}
    out: dict[str, Any] = {
        "shape": name, "tokens": args.tokens, "prompt": args.prompt, "rounds": args.rounds,
        "threads": args.threads, "torch_threads": torch.get_num_threads(),
        "gguf_bytes": {q: f["bytes"] for q, f in files.items()},
        "batch1_tok_s": {k: round(v, 1) for k, v in med1.items()},
        "batch1_tok_s_all_rounds": {k: [round(x, 1) for x in v] for k, v in b1.items()},
        "batch1_ratio_ours_over_llama_cpp": {n: round(med1[o] / med1[p], 3) for n, (o, p) in pairs.items()},
        "concurrent16_total_tok_s": {k: round(v, 1) for k, v in medc.items()},
        "concurrent16_total_tok_s_all_rounds": {k: [round(x, 1) for x in v] for k, v in cc.items()},
        "concurrent16_ratio_ours_over_llama_cpp_batched": {
            n: round(medc[o] / medc[p], 3) for n, (o, p) in pairs.items()},
    }
    if meds:
        out["concurrent16_llama_cpp_sequential_tok_s"] = {k: round(v, 1) for k, v in meds.items()}
        out["concurrent16_ratio_ours_over_llama_cpp_sequential"] = {
            n: round(medc[o] / meds[p], 3) for n, (o, p) in pairs.items()}
    out["agreement"] = {
        "llama_cpp_f32_f16kv_vs_ours_fp32": agreement(toks["f32"], toks["fp32"]),
        "llama_cpp_f32_f32kv_vs_ours_fp32": agreement(f32kv_toks, toks["fp32"][:AGREE_TOKENS]),
        "llama_cpp_q8_0_vs_ours_int8": agreement(toks["q8_0"], toks["int8"]),
        "llama_cpp_batched_vs_single_f32": agreement(btoks["f32"][0], toks["f32"]),
        "ours_batched_vs_single_fp32": agreement(btoks["fp32"][0], toks["fp32"]),
        "concurrent16_sequences_first_16_match_f32_vs_fp32": sum(
            a[:AGREE_TOKENS] == b[:AGREE_TOKENS] for a, b in zip(btoks["f32"], btoks["fp32"], strict=True)),
        "concurrent16_sequences_first_16_match_q8_0_vs_int8": sum(
            a[:AGREE_TOKENS] == b[:AGREE_TOKENS] for a, b in zip(btoks["q8_0"], btoks["int8"], strict=True)),
        "prompt_logits_max_abs_diff_llama_cpp_f32kv_vs_our_model": round(logit_diff, 6),
        "prompt_logits_max_abs": round(ref_max_abs, 3),
        "ours_fp32_first_tokens": toks["fp32"][:AGREE_TOKENS],
        "llama_cpp_f32_first_tokens": toks["f32"][:AGREE_TOKENS],
    }
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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median taken)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both (torch intra-op and llama.cpp n_threads)")
    ap.add_argument("--no-sequential", action="store_true",
                    help="skip llama.cpp running the 16 requests one after another")
    args = ap.parse_args()
    if args.tokens < 2 or args.prompt < 1 or args.rounds < 1 or args.threads < 1:
        ap.error("--tokens must be >= 2 and --prompt, --rounds, --threads >= 1")
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
