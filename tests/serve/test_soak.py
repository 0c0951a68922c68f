"""Soak: 64 concurrent streaming clients for a bounded time — none lost, none hung, and the
server's memory, slots and KV blocks back near their baseline afterwards."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from typing import Any

import httpx

from trustmoe.serve.app import create_app

CLIENTS = 64
ROUNDS = 1


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _client(c: httpx.AsyncClient, url: str, i: int,
                  max_tokens: int) -> tuple[int, str, str | None]:
    body = {"prompt": f"def func_{i}(x):", "max_tokens": max_tokens, "stream": True,
            "temperature": 0.8, "seed": i, "ignore_eos": i % 2 == 0}
    text, reason, done = [], None, False
    async with c.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ch = json.loads(line[6:])
            assert "error" not in ch, ch
            text.append(ch["choices"][0]["text"])
            reason = ch["choices"][0]["finish_reason"] or reason
    assert done, f"client {i} never saw [DONE]"
    return i, "".join(text), reason


async def _round(url: str, max_tokens: int) -> list[tuple[int, str, str | None]]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:  # 64 connections, one pool
        tasks = [_client(c, url, i, max_tokens) for i in range(CLIENTS)]
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)


def test_soak_64_streaming_clients(live_server: Any, shared_engine: Any) -> None:
    engine = shared_engine
    app = create_app(engine, max_concurrency=CLIENTS)
    state = app.state.trustmoe
    with live_server(app) as srv:
        asyncio.run(_round(srv.url, 1))  # warm up allocator, tokenizer, threads
        gc.collect()
        base_rss, base_kv = rss_mb(), engine.stats().kv_blocks_used
        t0 = time.monotonic()
        for _ in range(ROUNDS):
            results = asyncio.run(_round(srv.url, 8))
            assert sorted(i for i, _, _ in results) == list(range(CLIENTS))  # none lost
            for i, text, reason in results:
                assert reason in ("stop", "length"), (i, reason)
                if i % 2 == 0:
                    assert reason == "length" and text  # ignore_eos: ran the full length
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 5
        while (state.bridge.in_flight or state.active) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.active == 0 and state.bridge.in_flight == 0
        st = engine.stats()
        assert st.running == 0 and st.waiting == 0
        assert st.kv_blocks_used <= base_kv + CLIENTS  # at most prefix-cached prompt blocks
        gc.collect()
        grown = rss_mb() - base_rss
        assert grown < 64, f"RSS grew {grown:.0f} MiB over {ROUNDS * CLIENTS} requests"
        metrics = httpx.get(srv.url + "/metrics").text
        done = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("trustmoe:request_success_total"))
        assert done >= (ROUNDS + 1) * CLIENTS
    assert elapsed < 60
