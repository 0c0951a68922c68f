"""Serving throughput under concurrent HTTP load vs `transformers` `generate`, one by one.

    python benchmarks/serve_load.py            # bench-small, 16 and 64 clients (~2-3 min)
    python benchmarks/serve_load.py --quick    # fewer, shorter requests (~1 min)

Builds a random-weight model of the bench-small shape (../shared/bench-shapes.json) with a
byte-level BPE tokenizer, starts `trustmoe serve` on it in a subprocess (its own GIL and
threads), and sends streamed /v1/completions requests from C concurrent asyncio clients:
random token-id prompts, greedy, `ignore_eos` so every request makes exactly --max-tokens.
Reports total generated tokens/s, p50/p99 time to first token and inter-token latency.
The peer runs the same requests one by one through `transformers`
`MixtralForCausalLM.generate` (greedy, KV cache on) in this process, interleaved with our
runs so machine noise hits both. Prints one JSON object; `ratio_16` is the headline
(target >= 8 on bench-small).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path, shape: str, seed: int = 0) -> Path:
    from _models import write_random_model

    from trustmoe.config import get_preset

    write_random_model(out, get_preset(shape).model, seed)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, port: int, max_num_seqs: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "trustmoe.cli", "serve", str(model_dir), "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--max-queue", "512", "--max-concurrency",
           "1024", "--kv-cache-mb", "512", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not become healthy")


async def one_request(c: httpx.AsyncClient, url: str, prompt: list[int],
                      max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with c.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]  # counted by the server
    return {"ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in itertools.pairwise(stamps)], "tokens": tokens}


async def load_run(url: str, prompts: list[list[int]], clients: int,
                   max_tokens: int) -> dict[str, Any]:
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(c, url, queue.get_nowait(), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 3),
            "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
            "ttft_p99_ms": round(1000 * q(ttft, 0.99), 1),
            "itl_p50_ms": round(1000 * q(itl, 0.5), 2), "itl_p99_ms": round(1000 * q(itl, 0.99), 2)}


def peer_run(hf: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """The same requests one at a time through transformers' greedy generate (KV cache on)."""
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, use_cache=True,
                              pad_token_id=0)
            tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="bench-small", choices=["bench-small", "bench-medium"])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter requests")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--clients", default="16,64")
    ap.add_argument("--requests-per-client", type=int, default=None)
    ap.add_argument("--peer-requests", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    args = ap.parse_args()
    max_tokens = args.max_tokens or (32 if args.quick else 64)
    per_client = args.requests_per_client or (1 if args.quick else 2)
    n_peer = args.peer_requests or (4 if args.quick else 8)
    clients = [int(x) for x in args.clients.split(",")]

    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    proc = None
    try:
        model_dir = build_model(tmp / args.shape, args.shape)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        rng = random.Random(1)
        vocab = hf.config.vocab_size

        def prompts(n: int) -> list[list[int]]:
            return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 128))]
                    for _ in range(n)]

        port = free_port()
        proc = start_server(model_dir, port, args.max_num_seqs)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load_run(url, prompts(4), 4, 4))  # warm-up, both sides
        peer_run(hf, prompts(1), 4)
        result: dict[str, Any] = {"shape": args.shape, "max_tokens": max_tokens,
                                  "torch_threads": torch.get_num_threads(), "runs": {},
                                  "peer_runs": []}
        peer_prompts = prompts(n_peer)
        for c in clients:  # interleave: peer, ours, peer, ours
            result["peer_runs"].append(peer_run(hf, peer_prompts[: max(1, n_peer // 2)],
                                                max_tokens))
            asyncio.run(load_run(url, prompts(c), c, 8))  # warm this batch size (compile)
            result["runs"][str(c)] = asyncio.run(load_run(url, prompts(c * per_client), c,
                                                          max_tokens))
        peer_tps = statistics.mean(r["tokens_per_s"] for r in result["peer_runs"])
        result["peer_tokens_per_s"] = round(peer_tps, 1)
        for c in clients:
            result[f"ratio_{c}"] = round(result["runs"][str(c)]["tokens_per_s"] / peer_tps, 2)
        print(json.dumps(result, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
