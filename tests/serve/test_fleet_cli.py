"""`trustmoe serve registry:...` as a real process: the header, the API key on /admin/reload,
--follow swapping when the alias moves, and --help naming the options."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from trustmoe.cli import app
from trustmoe.deploy.registry import Registry


def test_serve_help_names_the_registry_options() -> None:
    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for opt in ("registry:NAME@ALIAS", "--registry", "--follow", "--poll-seconds", "--canary",
                "--canary-percent", "--shadow", "--shadow-percent", "--shadow-log", "/admin/reload",
                "x-trustmoe-model"):
        assert opt in r.output, opt


@pytest.mark.slow
def test_serve_registry_process_follows_the_alias(tmp_path: Path, model_dir_factory: Any) -> None:
    db = tmp_path / "reg.db"
    with Registry.open(db) as reg:
        for seed in (1, 2):
            reg.add(model_dir_factory(tmp_path / f"m{seed}", seed=seed), "m", why="test")
        reg.promote("m", 1, "production", why="test", force=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmoe.cli", "serve", "registry:m@production", "--registry",
         str(db), "--port", str(port), "--follow", "--poll-seconds", "0.3", "--kv-cache-mb", "8",
         "--log-level", "warning"],
        env={**os.environ, "TRUSTMOE_API_KEY": "k1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        r = httpx.post(url + "/admin/reload")
        assert r.status_code == 401 and r.headers["x-trustmoe-model"].startswith("m:1@sha256:")
        auth = {"Authorization": "Bearer k1"}
        assert httpx.post(url + "/admin/reload", headers=auth, timeout=60).status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        raw = client.chat.completions.with_raw_response.create(
            model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-trustmoe-model"].startswith("m:1@sha256:")
        with Registry.open(db) as reg:
            reg.promote("m", 2, "production", why="test", force=True)
        deadline = time.monotonic() + 60
        while True:
            raw = client.completions.with_raw_response.create(model="m", prompt="def", max_tokens=2)
            if raw.headers["x-trustmoe-model"].startswith("m:2@sha256:"):
                break
            assert time.monotonic() < deadline, "--follow did not swap"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
