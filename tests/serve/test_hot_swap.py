"""Hot swap under load: 32 streaming clients through 10 promote/rollback cycles, none dropped.

Every stream must answer 200, carry `x-trustmoe-model`, end each choice with a
finish_reason and end with `data: [DONE]`; streams that were in flight during a swap finish on
the engine they started on (their chunks name the same model throughout, their header the old
version).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from trustmoe.config import EngineConfig
from trustmoe.deploy.registry import Registry
from trustmoe.serve.app import create_app
from trustmoe.serve.fleet import MODEL_HEADER, ServeConfig

CLIENTS = 32
CYCLES = 10


async def stream_once(client: httpx.AsyncClient, url: str, i: int) -> tuple[str | None, str]:
    """One streamed completion: (None, header) when complete, else (what went wrong, header)."""
    body = {"prompt": f"def f{i}(", "max_tokens": 12, "stream": True, "temperature": 0.8,
            "seed": i, "user": f"user{i}"}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        header = r.headers.get(MODEL_HEADER, "")
        if r.status_code != 200:
            return f"status {r.status_code}: {(await r.aread())[:200]!r}", header
        reasons, done = [], False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                return f"error chunk {chunk['error']}", header
            reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
        if not header:
            return "no x-trustmoe-model header", header
        if not done or reasons not in (["stop"], ["length"]):
            return f"truncated: done={done} reasons={reasons}", header
        return None, header


async def run_clients(url: str, stop: threading.Event) -> tuple[int, list[str], set[str]]:
    failures: list[str] = []
    headers: set[str] = set()
    count = 0
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker(i: int) -> None:
            nonlocal count
            while not stop.is_set():
                try:
                    err, h = await stream_once(client, url, i)
                except httpx.HTTPError as e:
                    err, h = f"{type(e).__name__}: {e}", ""
                count += 1
                headers.add(h)
                if err:
                    failures.append(err)
        await asyncio.gather(*(worker(i) for i in range(CLIENTS)))
    return count, failures, headers


@pytest.mark.slow
def test_32_streams_through_10_promote_rollback_cycles(tmp_path: Path, model_dir_factory: Any,
                                                       live_server: Any) -> None:
    db = tmp_path / "reg.db"
    with Registry.open(db) as reg:
        for seed in (1, 2):
            reg.add(model_dir_factory(tmp_path / f"m{seed}", seed=seed), "m", why="test")
        reg.promote("m", 1, "production", why="test", force=True)
    cfg = ServeConfig(engine=EngineConfig(kv_cache_mb=16, max_num_seqs=CLIENTS, max_queue=64),
                      registry_url=str(db), max_concurrency=CLIENTS + 8)
    app = create_app("registry:m@production", cfg)
    fleet = app.state.fleet
    stop = threading.Event()
    result: dict[str, Any] = {}
    with live_server(app) as srv:
        t = threading.Thread(target=lambda: result.update(
            zip(("count", "failures", "headers"), asyncio.run(run_clients(srv.url, stop)),
                strict=True)))
        t.start()
        try:
            time.sleep(1.0)
            with Registry.open(db) as reg:
                for _ in range(CYCLES):
                    reg.promote("m", 2, "production", why="cycle", force=True)
                    r = httpx.post(srv.url + "/admin/reload", timeout=120)
                    assert r.status_code == 200 and r.json()["reloaded"][0]["key"] == "m:2", r.text
                    time.sleep(0.3)
                    reg.rollback("m", "production", why="cycle")
                    r = httpx.post(srv.url + "/admin/reload", timeout=120)
                    assert r.status_code == 200 and r.json()["reloaded"][0]["key"] == "m:1", r.text
                    time.sleep(0.3)
        finally:
            stop.set()
            t.join(120)
        deadline = time.monotonic() + 20
        while fleet._retiring and time.monotonic() < deadline:  # every old engine is freed
            time.sleep(0.05)
        assert not fleet._retiring
    assert result["failures"] == [], result["failures"][:5]
    assert result["count"] >= CLIENTS * 2
    assert {h.split("@")[0] for h in result["headers"]} == {"m:1", "m:2"}
    assert fleet.reloads == 2 * CYCLES
