"""`trustmoe serve ... --monitor monitor.toml` as a real process: /dashboard/status.json and
/dashboard answer, the served version is watched against its eval dir's profile, requests
reach the monitor, and Ctrl-C stops the server (and the monitor with it) cleanly. Bad
monitoring options fail with one line before any model loads."""

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
import pytest
from monitor_helpers import model_eval_dir, tokenizer_vocab, traffic

from trustmoe.cli import main
from trustmoe.deploy.registry import Registry

MONITOR_TOML = """
[monitor]
window = 5
ert_requests = 10000

[actions]
act = ["drift"]
action = "notify"
"""


@pytest.mark.parametrize(("args", "says"), [
    (["--monitor", "{bad}"], "unknown key"),
    (["--monitor", "{missing}"], "missing.toml"),
    (["--monitor", "{good}", "--replicas", "2"], "without --replicas"),
    (["--log-prompts"], "--log-prompts needs --monitor"),
])
def test_bad_monitor_options_fail_in_one_line(tmp_path: Path, args: list[str], says: str,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad, good = tmp_path / "bad.toml", tmp_path / "good.toml"
    bad.write_text("[monitor]\nwindoww = 5\n")
    good.write_text(MONITOR_TOML)
    paths = {"bad": bad, "good": good, "missing": tmp_path / "missing.toml"}
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    no_model = tmp_path / "no-model"  # never reached: the options are checked first
    no_model.mkdir()
    (no_model / "config.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["trustmoe", "serve", str(no_model), *argv])
    with pytest.raises(SystemExit) as e:
        main()  # what the `trustmoe` entry point runs
    out = capsys.readouterr()
    assert e.value.code == 2, out
    assert says in out.err and "Traceback" not in out.err + out.out
    assert len(out.err.strip().splitlines()) == 1, out.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 90) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_monitor_process_answers_status_json(tmp_path: Path, model_dir_factory: Any) -> None:
    model = model_dir_factory(tmp_path / "m1", seed=1)
    vocab = tokenizer_vocab(model)
    ev = model_eval_dir(model, tmp_path / "eval", traffic(seed=1, n=120, vocab=vocab))
    db = tmp_path / "reg.db"
    with Registry.open(db) as reg:
        reg.add(model, "demo", eval_dir=ev, why="test")
        reg.promote("demo", 1, "production", why="test", force=True)
    policy = tmp_path / "monitor.toml"
    policy.write_text(MONITOR_TOML)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trustmoe.cli", "serve", "registry:demo@production", "--registry",
         str(db), "--port", str(port), "--kv-cache-mb", "8", "--no-guard", "--monitor",
         str(policy), "--log-level", "warning"],
        env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc)
        prompts = traffic(seed=2, n=6, vocab=vocab)
        for p in prompts:
            r = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": p, "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while True:  # the worker calibrates demo:1's detectors, then observes the queue
            st = httpx.get(url + "/dashboard/status.json", timeout=10)
            assert st.status_code == 200 and st.headers["content-type"].startswith("application/json")
            body = st.json()
            if body["queue"]["observed"] >= len(prompts):
                break
            assert time.monotonic() < deadline, body["queue"]
            time.sleep(0.2)
        assert [v["key"] for v in body["served"]] == ["demo:1"]
        assert body["versions"]["demo:1"]["requests"] == len(prompts)
        assert body["versions"]["demo:1"]["windows"] == 1  # window = 5 from monitor.toml
        assert body["versions"]["demo:1"]["info"]["profile_ref"].startswith(body["served"][0]["eval_dir"])
        assert body["policy"]["window"] == 5 and body["policy"]["action"] == "notify"
        assert body["aliases"]["demo"]["current"] == {"production": 1}
        page = httpx.get(url + "/dashboard", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "demo:1" in page.text and "<svg" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
