"""Bad input gets an OpenAI-style error with the right status, and the server keeps serving;
backpressure answers 429 with Retry-After; a client that goes away frees its slot."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from trustmoe.serve.app import create_app

JSON = {"content-type": "application/json"}
HTTP = httpx.Client(timeout=30)  # one pool: a client per call would rebuild its TLS context


@pytest.fixture(scope="module")
def srv(live_server: Any, shared_engine: Any) -> Iterator[Any]:
    engine = shared_engine
    app = create_app(engine, max_concurrency=6)
    with live_server(app) as s:
        s.engine, s.state = engine, app.state.trustmoe
        yield s


def _post(srv: Any, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    if isinstance(body, dict):
        return HTTP.post(srv.url + path, json=body)
    return HTTP.post(srv.url + path, content=body, headers=JSON)


def _ok(srv: Any) -> None:
    r = _post(srv, "/v1/completions", {"prompt": "def", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# (path, body, status, needle in message or param, OpenAI's error code). Like OpenAI, every
# error about a request's content is 400; the code says which kind.
CASES = [
    ("/v1/completions", b"{not json", 400, "not valid JSON", "invalid_json"),
    ("/v1/completions", b'{"prompt": "\xff\xfe caf\xe9"}', 400, "UTF-8", None),
    ("/v1/completions", b"[1, 2]", 400, "JSON object", "invalid_type"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"prompt": 12}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {}, 400, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens",
     "integer_below_min_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "context",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x " * 400, "max_tokens": 4}, 400, "context",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n", "integer_above_max_value"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature",
     "integer_below_min_value"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature",
     "decimal_below_min_value"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "integer_below_min_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs", "integer_above_max_value"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4", "model_not_found"),
    ("/v1/completions", {"prompt": [[1, 2], [10**7]]}, 400, "vocabulary", None),
    ("/v1/completions", {"prompt": ""}, 400, "empty", None),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 5}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "empty_array"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role",
     "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": {"type": "object", "patternProperties":
                                                          {"a": {}}}}}}, 400, "patternProperties",
     None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "yaml"}}, 400, "response_format",
     "invalid_type"),
]


@pytest.mark.parametrize(("path", "body", "status", "needle", "code"), CASES)
def test_bad_request(srv: Any, path: str, body: Any, status: int, needle: str,
                     code: str | None) -> None:
    r = _post(srv, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower() or needle == err.get("param")
    assert set(err) >= {"message", "type", "code"} and "Traceback" not in r.text
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if code is not None:
        assert err["code"] == code, err
    _ok(srv)  # and the server keeps serving


def test_openai_client_sees_bad_request_error(srv: Any) -> None:
    """The real `openai` client maps our 400s to BadRequestError with OpenAI's codes."""
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=10**9)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", extra_body={"max_tokens": "many"})
    assert e.value.code == "invalid_type" and e.value.param == "max_tokens"


def test_unknown_route_and_method(srv: Any) -> None:
    r = HTTP.get(srv.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = HTTP.get(srv.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_body_too_large_is_413(srv: Any) -> None:
    r = HTTP.post(srv.url + "/v1/completions", content=b"x" * (5 << 20), headers=JSON)
    assert r.status_code == 413
    _ok(srv)


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@contextlib.contextmanager
def slow_engine(engine: Any, delay: float = 0.02) -> Iterator[None]:
    """Make each engine step take a while, so long requests are surely still running."""
    step = engine.step

    def slow() -> Any:
        time.sleep(delay)
        return step()

    engine.step = slow
    try:
        yield
    finally:
        del engine.step  # back to the class method


def _long_stream(srv: Any, stop: threading.Event, started: list[int]) -> None:
    body = {"prompt": "def", "max_tokens": 200, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with HTTP.stream("POST", srv.url + "/v1/completions", json=body) as r:
        started.append(r.status_code)
        for _ in r.iter_lines():
            if stop.is_set():
                break  # leaving the block closes the connection mid-stream


def test_over_concurrency_gets_429_then_recovers(srv: Any) -> None:
    stop, started = threading.Event(), []
    threads = [threading.Thread(target=_long_stream, args=(srv, stop, started)) for _ in range(6)]
    with slow_engine(srv.engine):
        for t in threads:
            t.start()
        try:
            assert _wait(lambda: srv.state.active == 6), srv.state.active
            r = _post(srv, "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert started == [200] * 6
    # disconnects freed every slot, batch entry and KV block
    assert _wait(lambda: srv.state.active == 0 and srv.state.bridge.in_flight == 0)
    assert _wait(lambda: srv.engine.stats().running == 0 and srv.engine.stats().waiting == 0)
    _ok(srv)


def test_full_engine_queue_gets_429(live_server: Any, small_engine: Any) -> None:
    engine = small_engine
    with live_server(create_app(engine, max_concurrency=64)) as s, slow_engine(engine):
        stop, started = threading.Event(), []
        threads = [threading.Thread(target=_long_stream, args=(s, stop, started))
                   for _ in range(2)]
        try:
            for n, t in enumerate(threads, 1):  # one running, then one waiting: queue full
                t.start()
                assert _wait(lambda n=n: s.app.state.trustmoe.bridge.in_flight == n
                             and engine.stats().running == 1)
            r = _post(s, "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429 and "queue" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "1"
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert started == [200, 200]


def aborted(srv: Any) -> float:
    text = HTTP.get(srv.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("trustmoe:request_success_total") and '"abort"' in line)


def test_disconnect_frees_slot_and_kv_blocks(srv: Any) -> None:
    with slow_engine(srv.engine):
        _disconnects(srv)


def _disconnects(srv: Any) -> None:
    base, n_abort = srv.engine.stats(), aborted(srv)
    body = {"prompt": "def", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with HTTP.stream("POST", srv.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert srv.engine.stats().kv_blocks_used > base.kv_blocks_used
    t0 = time.monotonic()
    assert _wait(lambda: srv.state.bridge.in_flight == 0 and srv.engine.stats().running == 0,
                 timeout=2.0)
    assert time.monotonic() - t0 < 2.0
    assert srv.engine.stats().kv_blocks_used <= base.kv_blocks_used + 1  # prefix cache may keep 1
    assert aborted(srv) == n_abort + 1
    # a non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        HTTP.post(srv.url + "/v1/completions", timeout=0.3,
                   json={"prompt": "def", "max_tokens": 240, "ignore_eos": True})
    assert _wait(lambda: srv.state.bridge.in_flight == 0 and srv.state.active == 0, timeout=3.0)
    assert aborted(srv) == n_abort + 2


def test_engine_failure_fails_in_flight_requests_only(srv: Any) -> None:
    """A step that raises ends the requests in flight with a 500 body; the server goes on."""
    step, calls = srv.engine.step, []

    def broken() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel failure")
        return step()

    srv.engine.step = broken
    try:
        r = _post(srv, "/v1/completions", {"prompt": "def", "max_tokens": 4})
    finally:
        del srv.engine.step
    assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]["message"]
    assert _wait(lambda: srv.state.active == 0 and srv.state.bridge.in_flight == 0)
    assert httpx.get(srv.url + "/health").status_code == 200
    _ok(srv)
