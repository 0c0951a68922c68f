"""`trustmoe serve`: help, one-line failures, and a real process serving the OpenAI client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from trustmoe.cli import app
from trustmoe.io import TrustmoeError


def test_serve_help_explains_options() -> None:
    r = CliRunner().invoke(app, ["serve", "--help"])
    assert r.exit_code == 0
    for opt in ("--port", "--quantize", "--kv-cache-mb", "--max-concurrency", "--max-queue",
                "--api-key", "/v1/chat/completions"):
        assert opt in r.output, opt


def test_serve_bad_input_fails_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert isinstance(r.exception, TrustmoeError) and "not found" in str(r.exception)
    r = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert isinstance(r.exception, TrustmoeError) and "config.json" in str(r.exception)
    r = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--quantize", "int3"])
    assert isinstance(r.exception, TrustmoeError) and "int8" in str(r.exception)
    r = CliRunner().invoke(app, ["serve", str(tiny_model_dir), "--port", "70000"])
    assert r.exit_code == 2  # typer's range check


@pytest.mark.slow
def test_serve_process_end_to_end(tiny_model_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TRUSTMOE_API_KEY": "k1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmoe.cli", "serve", str(tiny_model_dir), "--port", str(port),
         "--quantize", "int8", "--kv-cache-mb", "8", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # key from the environment
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=tiny_model_dir.name, max_tokens=5,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 5
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode is not None


def test_serve_options_are_the_engine_config() -> None:
    """Every engine option of `trustmoe serve` shows the default EngineConfig declares."""
    from trustmoe.config import EngineConfig

    r = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0
    cfg = EngineConfig()
    for opt, value in (("--kv-cache-mb", cfg.kv_cache_mb), ("--block-size", cfg.block_size),
                       ("--max-num-seqs", cfg.max_num_seqs), ("--max-queue", cfg.max_queue),
                       ("--prefill-chunk", cfg.prefill_chunk), ("--group-size", cfg.group_size),
                       ("--device", cfg.device)):
        line = next(ln for ln in r.output.splitlines() if opt in ln)
        assert f"[default: {value}]" in line, line
    assert "--no-batch-invariant" in r.output and "--no-prefix-caching" in r.output
