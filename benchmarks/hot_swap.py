"""Latency while `trustmoe serve` hot-swaps registry versions vs in steady state.

    python benchmarks/hot_swap.py                      # tiny preset, 32 clients, 10 cycles
    python benchmarks/hot_swap.py --shape bench-small --cycles 5

Builds two random-weight models of one shape, registers them in a fresh SQLite registry
(v1 production), starts `trustmoe serve registry:m@production` in a subprocess and keeps C
streaming clients busy (greedy, `ignore_eos`, --max-tokens each). Phase 1 (steady, --steady-s
seconds): no swaps. Phase 2: --cycles promote(v2)/reload, rollback(v1)/reload pairs, each
reload through `POST /admin/reload` (the new engine loads while the old one serves).
A request counts as "during swap" when its lifetime overlaps a reload call or the second after
it (the old engine draining). Prints one JSON object: per phase p50/p95/p99 of end-to-end
latency and time to first token, requests, failures (non-200, missing header, no [DONE] or no
finish_reason), and `ratio_p99_e2e` = swap p99 / steady p99 (the peer here is the same server
in steady state, measured in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    start: float
    end: float
    ttft: float | None
    ok: bool
    header: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(root: Path, shape: str) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from _models import write_random_model

    from trustmoe.config import get_preset
    from trustmoe.deploy.registry import Registry

    db = root / "reg.db"
    with Registry.open(db) as reg:
        for seed in (1, 2):
            d = root / f"m{seed}"
            write_random_model(d, get_preset(shape).model, seed)
            reg.add(d, "m", why="benchmark")
        reg.promote("m", 1, "production", why="benchmark", force=True)
    return db


async def one(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> Sample:
    t0 = time.monotonic()
    ttft, done, reason, header = None, False, None, ""
    body = {"prompt": f"abc {i}", "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            header = r.headers.get("x-trustmoe-model", "")
            if r.status_code != 200:
                return Sample(t0, time.monotonic(), None, False, header)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                for c in chunk.get("choices", []):
                    if c.get("text") and ttft is None:
                        ttft = time.monotonic() - t0
                    reason = c.get("finish_reason") or reason
    except httpx.HTTPError:
        return Sample(t0, time.monotonic(), ttft, False, header)
    return Sample(t0, time.monotonic(), ttft, done and reason is not None and bool(header), header)


async def clients(url: str, n: int, max_tokens: int, stop: threading.Event) -> list[Sample]:
    out: list[Sample] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n + 4)) as c:
        async def worker(i: int) -> None:
            k = 0
            while not stop.is_set():
                out.append(await one(c, url, i * 100000 + k, max_tokens))
                k += 1
        await asyncio.gather(*(worker(i) for i in range(n)))
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def summary(samples: list[Sample]) -> dict[str, Any]:
    e2e = [s.end - s.start for s in samples if s.ok]
    ttft = [s.ttft for s in samples if s.ok and s.ttft is not None]
    return {"requests": len(samples), "failures": sum(not s.ok for s in samples),
            **{f"e2e_p{int(q * 100)}_s": pct(e2e, q) for q in (0.5, 0.95, 0.99)},
            **{f"ttft_p{int(q * 100)}_s": pct(ttft, q) for q in (0.5, 0.95, 0.99)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="model preset (tiny, bench-small, ...)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--steady-s", type=float, default=15.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = setup(Path(tmp), args.shape)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "trustmoe.cli", "serve", "registry:m@production",
               "--registry", str(db), "--port", str(port), "--max-concurrency",
               str(args.clients + 8), "--max-num-seqs", str(args.clients), "--max-queue", "256",
               "--log-level", "warning", "--no-guard"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "TRUSTMOE_API_KEY": ""})
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(proc.stderr.read().decode()[-2000:])  # type: ignore[union-attr]
                try:
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not become ready")
                time.sleep(0.2)
            stop = threading.Event()
            got: list[list[Sample]] = []
            t = threading.Thread(target=lambda: got.append(
                asyncio.run(clients(url, args.clients, args.max_tokens, stop))))
            t.start()
            time.sleep(args.steady_s)
            swap_start = time.monotonic()
            windows: list[tuple[float, float]] = []
            reload_s: list[float] = []
            from trustmoe.deploy.registry import Registry

            with Registry.open(db) as reg:
                for _ in range(args.cycles):
                    for move in (lambda: reg.promote("m", 2, "production", why="bench", force=True),
                                 lambda: reg.rollback("m", "production", why="bench")):
                        move()
                        a = time.monotonic()
                        r = httpx.post(url + "/admin/reload", timeout=300)
                        b = time.monotonic()
                        if r.status_code != 200:
                            raise SystemExit(f"reload failed: {r.text}")
                        windows.append((a, b + 1.0))
                        reload_s.append(b - a)
                        time.sleep(1.0)
            stop.set()
            t.join()
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    samples = got[0]
    steady = [s for s in samples if s.end < swap_start]
    during = [s for s in samples if any(s.start < b and s.end > a for a, b in windows)]
    st, sw = summary(steady), summary(during)
    ratio = (round(sw["e2e_p99_s"] / st["e2e_p99_s"], 3)
             if sw["e2e_p99_s"] and st["e2e_p99_s"] else None)
    print(json.dumps({
        "benchmark": "hot_swap", "shape": args.shape, "clients": args.clients,
        "cycles": args.cycles, "swaps": len(windows), "max_tokens": args.max_tokens,
        "reload_s": {"p50": pct(reload_s, 0.5), "max": round(max(reload_s), 3)},
        "steady": st, "during_swap": sw, "ratio_p99_e2e": ratio,
        "failures_total": sum(not s.ok for s in samples),
        "versions_seen": sorted({s.header.split("@")[0] for s in samples if s.header}),
        "cpu_count": os.cpu_count(), "mean_e2e_all_s": round(statistics.fmean(
            [s.end - s.start for s in samples if s.ok]), 4) if samples else None,
    }, indent=2))


if __name__ == "__main__":
    main()
