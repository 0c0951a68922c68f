"""Ray Serve: a local Ray with 2 trustmoe replicas behind one address, the real openai client."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from trustmoe.config import EngineConfig
from trustmoe.deploy.registry import Registry
from trustmoe.serve.fleet import MODEL_HEADER, ServeConfig

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'trustmoe[ray]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_ray_replicas_behind_one_address(tmp_path: Path, tiny_model_dir: Path) -> None:
    from trustmoe.serve.ray import deployment, run, shutdown

    db = tmp_path / "reg.db"
    with Registry.open(db) as reg:
        reg.add(tiny_model_dir, "m", why="test")
        reg.promote("m", 1, "production", why="test", force=True)
    cfg = ServeConfig(engine=EngineConfig(kv_cache_mb=8, max_num_seqs=4, num_threads=1),
                      registry_url=str(db))
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run(deployment("registry:m@production", cfg, replicas=2,
                       ray_actor_options={"num_cpus": 0.5}), port=port)
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=2, timeout=120)
        pids = set()
        for i in range(12):
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4)
            assert raw.headers[MODEL_HEADER].startswith("m:1@sha256:")
            r = raw.parse()
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 4
            pids.add(httpx.get(url + "/ready", timeout=30).json()["pid"])
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:  # the proxy spreads over both
            pids.add(httpx.get(url + "/ready", timeout=30).json()["pid"])
        assert len(pids) == 2, pids
        stream = client.completions.create(model="m", prompt="def", max_tokens=5, stream=True)
        reasons = [c.choices[0].finish_reason for c in stream if c.choices]
        assert reasons[-1] in ("stop", "length")
    finally:
        shutdown()
