"""Serving throughput under concurrent HTTP load vs `transformers` `generate`, one by one.

    python benchmarks/serve_load.py            # bench-small, 16 and 64 clients (~2-3 min)
    python benchmarks/serve_load.py --quick    # fewer, shorter requests (~1 min)
    python benchmarks/serve_load.py --monitor --quick   # monitoring overhead (~2 min)

Builds a random-weight model of the bench-small shape (../shared/bench-shapes.json) with a
byte-level BPE tokenizer, starts `trustmoe serve` on it in a subprocess (its own GIL and
threads), and sends streamed /v1/completions requests from C concurrent asyncio clients:
random token-id prompts, greedy, `ignore_eos` so every request makes exactly --max-tokens.
Reports total generated tokens/s, p50/p99 time to first token and inter-token latency.
The peer runs the same requests one by one through `transformers`
`MixtralForCausalLM.generate` (greedy, KV cache on) in this process, interleaved with our
runs so machine noise hits both. Prints one JSON object; `ratio_16` is the headline
(target >= 8 on bench-small).

`--monitor`: the same load against two servers of the same registry version, one plain and
one with `--monitor` (engine features on, every request observed by the live monitor against
the version's eval profile: drift windows of 50 requests, SLOs), runs interleaved off/on
`--repeats` times so machine noise hits both. No transformers peer. Prints one JSON object
with both tokens/s and `overhead` = 1 - on/off per client count (target <= 0.05), plus what the
monitor saw (requests observed, windows, incidents) to show it really worked.
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


def start_server(model_ref: Path | str, port: int, max_num_seqs: int,
                 extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "trustmoe.cli", "serve", str(model_ref), "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--max-queue", "512", "--max-concurrency",
           "1024", "--kv-cache-mb", "512", "--log-level", "warning", *(extra or [])]
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


MONITOR_TOML = """
[monitor]
window = 50
ert_requests = 100000
cooldown_s = 0

[actions]
act = ["drift", "slo"]
action = "notify"

[slo]
window = 100
p99_latency_s = 60.0
max_error_rate = 0.05
"""


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def monitored(url: str, key: str, timeout: float = 300) -> dict[str, Any]:
    """status.json once the monitor watches `key` (its detectors are calibrated)."""
    deadline = time.monotonic() + timeout
    while True:
        st = httpx.get(url + "/dashboard/status.json", timeout=30).json()
        if key in st["versions"]:
            return dict(st)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the monitor never watched {key}: {st['queue']}")
        time.sleep(0.5)


def monitor_main(args: argparse.Namespace, max_tokens: int, per_client: int,
                 clients: list[int]) -> None:
    """Tokens/s with and without `--monitor`, same model, same requests, interleaved."""
    from trustmoe.deploy.registry import Registry
    from trustmoe.eval.profile import profile_from_prompts, save_profile
    from trustmoe.model.hf import load

    tmp = Path(tempfile.mkdtemp(prefix="serve_load_monitor_"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        model_dir = build_model(tmp / args.shape, args.shape)
        model = load(model_dir)
        rng = random.Random(1)
        vocab = model.config.vocab_size

        def prompts(n: int) -> list[list[int]]:
            return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 128))]
                    for _ in range(n)]

        eval_dir = tmp / "eval"  # the version's reference: the same kind of prompts as the load
        save_profile(profile_from_prompts(model, prompts(256), {"kind": "benchmark traffic"}),
                     eval_dir)
        (eval_dir / "eval.json").write_text("{}")
        del model
        db = tmp / "registry.db"
        with Registry.open(db) as reg:
            reg.add(model_dir, "bench", eval_dir=eval_dir, why="serve_load --monitor")
            reg.promote("bench", 1, "production", why="benchmark", force=True)
        (tmp / "monitor.toml").write_text(MONITOR_TOML)
        base = ["--registry", str(db), "--no-guard"]
        urls = {}
        for side, extra in (("off", base), ("on", [*base, "--monitor", str(tmp / "monitor.toml")])):
            port = free_port()
            procs[side] = start_server("registry:bench@production", port, args.max_num_seqs, extra)
            urls[side] = f"http://127.0.0.1:{port}"
        monitored(urls["on"], "bench:1")
        for url in urls.values():
            asyncio.run(load_run(url, prompts(4), 4, 4))  # warm-up
        result: dict[str, Any] = {"shape": args.shape, "max_tokens": max_tokens, "mode": "monitor",
                                  "repeats": args.repeats, "runs": {}}
        for c in clients:
            for url in urls.values():
                asyncio.run(load_run(url, prompts(c), c, 8))  # warm this batch size
            runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
            for _ in range(args.repeats):  # off, on, off, on: noise hits both
                batch = prompts(c * per_client)
                for side in ("off", "on"):
                    runs[side].append(asyncio.run(load_run(urls[side], batch, c, max_tokens)))
            tps = {side: statistics.mean(r["tokens_per_s"] for r in rs) for side, rs in runs.items()}
            result["runs"][str(c)] = {
                "tokens_per_s_off": round(tps["off"], 1), "tokens_per_s_on": round(tps["on"], 1),
                "ratio_on_off": round(tps["on"] / tps["off"], 3),
                "overhead": round(1 - tps["on"] / tps["off"], 3), "off": runs["off"], "on": runs["on"]}
        st = monitored(urls["on"], "bench:1")
        v = st["versions"]["bench:1"]
        result["monitor"] = {"observed": st["queue"]["observed"], "dropped": st["queue"]["dropped"],
                             "failed": st["queue"]["failed"], "requests": v["requests"],
                             "drift_windows": v["windows"], "incidents": len(st.get("incidents", []))}
        result["overhead"] = max(r["overhead"] for r in result["runs"].values())
        print(json.dumps(result, indent=2))
    finally:
        for proc in procs.values():
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="bench-small", choices=["bench-small", "bench-medium"])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter requests")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--clients", default="16,64")
    ap.add_argument("--requests-per-client", type=int, default=None)
    ap.add_argument("--peer-requests", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--monitor", action="store_true",
                    help="tokens/s with vs without --monitor (live monitoring), same run")
    ap.add_argument("--repeats", type=int, default=2, help="with --monitor: off/on pairs per client count")
    ap.add_argument("--server-args", default="",
                    help="extra `trustmoe serve` options, e.g. --server-args=--no-guard (the guard "
                         "is on by default; off, the engine and HTTP path are measured alone)")
    args = ap.parse_args()
    max_tokens = args.max_tokens or (32 if args.quick else 64)
    per_client = args.requests_per_client or (1 if args.quick else 2)
    n_peer = args.peer_requests or (4 if args.quick else 8)
    clients = [int(x) for x in args.clients.split(",")]
    if args.monitor:
        monitor_main(args, max_tokens, per_client, clients)
        return

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
        proc = start_server(model_dir, port, args.max_num_seqs, args.server_args.split())
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
        result["server_args"] = args.server_args.split()
        print(json.dumps(result, indent=2))
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
