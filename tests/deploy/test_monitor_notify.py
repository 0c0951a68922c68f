"""The webhook against a real HTTP receiver started by the test: body, signature, retries, timeout."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from trustmoe.deploy.incidents import Incident
from trustmoe.deploy.notify import WebhookNotifier
from trustmoe.deploy.policy import WebhookPolicy


class Receiver:
    """A local HTTP server answering each POST with the next scripted status (then 200)."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.script: list[int | str] = []  # status codes, or "hang" to sleep past the timeout
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rec.got.append({"headers": dict(self.headers), "body": body})
                step = rec.script.pop(0) if rec.script else 200
                if step == "hang":
                    time.sleep(1.0)
                    step = 200
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gave up
                    self.send_response(int(step))
                    self.end_headers()
                    self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _incident() -> Incident:
    return Incident(detector="hidden", version="demo:3", statistic=0.3, threshold=0.1, direction="above",
                    effect=0.3, floor=0.0, explanation="MMD² 0.3", window={"size": 100}, consecutive=2,
                    action="rollback_canary", dataset_manifest_sha256="cd" * 32)


def test_posts_the_incident_signed(receiver: Receiver) -> None:
    n = WebhookNotifier(receiver.url, secret="s3cret", backoff_s=0.01)
    inc = _incident()
    d = n.notify(inc)
    assert d.ok and d.attempts == 1 and d.status == 200
    [msg] = receiver.got
    body = json.loads(msg["body"])
    assert body["event"] == "incident" and body["incident"]["id"] == inc.id
    assert body["incident"]["dataset_manifest_sha256"] == "cd" * 32
    assert msg["headers"]["Content-Type"] == "application/json"
    want = hmac.new(b"s3cret", msg["body"], hashlib.sha256).hexdigest()
    assert msg["headers"]["X-Trustmoe-Signature"] == f"sha256={want}"


def test_retries_server_errors_but_not_client_errors(receiver: Receiver) -> None:
    receiver.script = [503, 500]
    d = WebhookNotifier(receiver.url, retries=3, backoff_s=0.01).notify(_incident())
    assert d.ok and d.attempts == 3 and len(receiver.got) == 3
    receiver.script = [400]
    d = WebhookNotifier(receiver.url, retries=3, backoff_s=0.01).notify(_incident())
    assert not d.ok and d.attempts == 1 and d.status == 400
    receiver.script = [500, 500, 500]
    d = WebhookNotifier(receiver.url, retries=2, backoff_s=0.01).notify(_incident())
    assert not d.ok and d.attempts == 3 and d.error == "HTTP 500"


def test_timeout_then_success_and_unreachable(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver.script = ["hang"]
    d = WebhookNotifier(receiver.url, timeout_s=0.2, retries=1, backoff_s=0.01).notify(_incident())
    assert d.ok and d.attempts == 2
    port = receiver.server.server_address[1]
    receiver.close()
    t0 = time.perf_counter()
    d = WebhookNotifier(f"http://127.0.0.1:{port}/hook", timeout_s=0.2, retries=1, backoff_s=0.01).notify(_incident())
    assert not d.ok and d.status is None and d.error and time.perf_counter() - t0 < 5
    monkeypatch.setenv("HOOK_SECRET", "abc")
    n = WebhookNotifier.from_policy(WebhookPolicy("http://x/hook", 2.0, 4, "HOOK_SECRET"))
    assert (n.secret, n.timeout_s, n.retries) == ("abc", 2.0, 4)
    with pytest.raises(ValueError):
        WebhookNotifier("file:///etc/passwd")


def test_monitor_notifies_every_incident(receiver: Receiver) -> None:
    from drift_synth import Stream, synthetic_profile

    from trustmoe.deploy.drift import DETECTORS, DetectorSpec
    from trustmoe.deploy.monitor import Monitor, RequestRecord, VersionInfo
    from trustmoe.deploy.policy import Policy

    pol = Policy(window=10, ert_requests=1000, consecutive=1,
                 detectors={d: DetectorSpec(enabled=d == "tokens") for d in DETECTORS})
    mon = Monitor(pol, notifier=WebhookNotifier(receiver.url, backoff_s=0.01))
    mon.add_version(VersionInfo("demo:3"), synthetic_profile(200))
    opened = []
    for i, f in enumerate(Stream(4, shift=0.8).take(10)):
        opened += mon.observe(RequestRecord(f"r{i}", "demo:3", float(i), features=f))
    [inc] = opened
    assert inc.details["notification"] == {"ok": True, "attempts": 1, "status": 200, "error": None}
    assert json.loads(receiver.got[0]["body"])["incident"]["detector"] == "tokens"
