"""Serving from the registry: resolution, the version header, canary routing, reloads, bad refs.

A real SQLite registry with three versions of one tiny model (different random weights):
v1 production, v2 canary/candidate, v3 whose weights blob is deleted (a reload to it fails).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from trustmoe.cli import app as cli_app
from trustmoe.config import EngineConfig
from trustmoe.deploy.registry import Registry
from trustmoe.io import TrustmoeError
from trustmoe.serve.app import create_app
from trustmoe.serve.fleet import (
    MODEL_HEADER,
    USER_HEADER,
    FinishedRequest,
    Fleet,
    ReloadError,
    ServeConfig,
    ServedVersion,
    user_bucket,
    user_hash,
)

ENGINE = EngineConfig(kv_cache_mb=8, max_num_seqs=8, max_queue=32)


@pytest.fixture(scope="module")
def reg_db(tmp_path_factory: pytest.TempPathFactory, model_dir_factory: Any) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    dirs = [model_dir_factory(root / f"m{i}", seed=i) for i in (1, 2, 3)]
    db = root / "reg.db"
    with Registry.open(db) as reg:
        for d in dirs:
            reg.add(d, "m", why="test")
        reg.promote("m", 1, "production", why="test", force=True)
        reg.promote("m", 2, "canary", why="test", force=True)
        reg.promote("m", 2, "candidate", why="test", force=True)
        reg.promote("m", 3, "broken", why="test", force=True)
        for f in reg.files("m", 3):
            if f.path == "model.safetensors":
                reg.store.blob_path(f.sha256).unlink()
    return db


def _cfg(db: Path, **kw: Any) -> ServeConfig:
    return ServeConfig(engine=ENGINE, registry_url=str(db), **kw)


def _promote(db: Path, version: int, alias: str = "production") -> None:
    with Registry.open(db) as reg:
        reg.promote("m", version, alias, why="test", force=True)


def _complete(url: str, **kw: Any) -> httpx.Response:
    body = {"model": "m", "prompt": "def", "max_tokens": 3, "temperature": 0, **kw.pop("body", {})}
    return httpx.post(url + "/v1/completions", json=body, timeout=60, **kw)


@pytest.fixture(scope="module")
def canary_srv(reg_db: Path, live_server: Any) -> Iterator[Any]:
    app = create_app("registry:m@production", _cfg(reg_db, canary="m@canary", canary_percent=50,
                                                   api_key="k"))
    with live_server(app) as s:
        s.fleet = app.state.fleet
        s.auth = {"Authorization": "Bearer k"}
        yield s


def test_resolves_registry_refs_and_names_the_version(canary_srv: Any) -> None:
    prod, canary = canary_srv.fleet.versions()
    assert (prod.key, prod.role, canary.key, canary.role) == ("m:1", "production", "m:2", "canary")
    assert prod.header == f"m:1@sha256:{prod.digest[:12]}" and len(prod.digest) == 64
    assert prod.model_dir.is_dir() and prod.ref == "registry:m@production"
    client = openai.OpenAI(base_url=canary_srv.url + "/v1", api_key="k", max_retries=0)
    raw = client.completions.with_raw_response.create(model="m", prompt="def", max_tokens=2,
                                                      user="alice")
    assert raw.headers[MODEL_HEADER] in (prod.header, canary.header)
    assert sorted(m.id for m in client.models.list().data) == ["m", "m:1", "m:2"]
    # errors carry the header too: 401 (no key), 400 (bad body), and a stream
    r = httpx.post(canary_srv.url + "/v1/completions", json={})
    assert r.status_code == 401 and r.headers[MODEL_HEADER] == prod.header
    r = _complete(canary_srv.url, headers=canary_srv.auth, body={"max_tokens": -1})
    assert r.status_code == 400 and r.headers[MODEL_HEADER] in (prod.header, canary.header)
    with httpx.stream("POST", canary_srv.url + "/v1/completions", headers=canary_srv.auth,
                      json={"prompt": "def", "max_tokens": 3, "stream": True}, timeout=60) as s:
        assert s.headers[MODEL_HEADER] in (prod.header, canary.header)
        assert list(s.iter_lines())[-2:] == ["data: [DONE]", ""] or "[DONE]" in s.read().decode()
    assert httpx.get(canary_srv.url + "/ready").json()["ready"] is True  # open like /health


def test_canary_is_sticky_per_user_and_split_by_percent(canary_srv: Any) -> None:
    prod, canary = canary_srv.fleet.versions()
    seen: dict[str, set[str]] = {}
    for user in ("alice", "bob", "carol", "dave"):
        for _ in range(3):
            r = _complete(canary_srv.url, headers=canary_srv.auth, body={"user": user})
            assert r.status_code == 200
            seen.setdefault(user, set()).add(r.headers[MODEL_HEADER])
        expect = canary.header if user_bucket(user_hash(user) or "") < 50 else prod.header
        assert seen[user] == {expect}, user
    # the header sets the sticky key as well as the `user` field
    r = _complete(canary_srv.url, headers={**canary_srv.auth, USER_HEADER: "alice"})
    assert r.headers[MODEL_HEADER] in seen["alice"]
    # the hash buckets split users in the asked proportion
    share = sum(user_bucket(user_hash(f"u{i}") or "") < 50 for i in range(2000)) / 2000
    assert 0.45 < share < 0.55
    # a model key pins the version; 0 % sends everyone to production
    r = _complete(canary_srv.url, headers=canary_srv.auth, body={"model": "m:2", "user": "x"})
    assert r.headers[MODEL_HEADER] == canary.header
    r = httpx.post(canary_srv.url + "/admin/canary", json={"percent": 0}, headers=canary_srv.auth)
    assert r.json() == {"canary_percent": 0.0}
    for user in ("alice", "bob", "carol", "dave"):
        r = _complete(canary_srv.url, headers=canary_srv.auth, body={"user": user})
        assert r.headers[MODEL_HEADER] == prod.header
    assert httpx.post(canary_srv.url + "/admin/canary", json={"percent": 101},
                      headers=canary_srv.auth).status_code == 400
    text = httpx.get(canary_srv.url + "/metrics", headers=canary_srv.auth).text
    assert 'trustmoe:requests_total{model_name="m",role="canary",status="200",version="m:2"}' in text
    assert 'trustmoe:requests_total{model_name="m",role="production",status="200",version="m:1"}' in text
    assert 'trustmoe:generation_tokens_total{model_name="m",version="m:2"}' in text
    assert 'trustmoe:canary_percent 0.0' in text


def test_reload_swaps_frees_the_old_engine_and_reports(reg_db: Path, live_server: Any) -> None:
    app = create_app("registry:m@production", _cfg(reg_db))
    fleet: Fleet = app.state.fleet
    finished: list[FinishedRequest] = []
    swaps: list[list[ServedVersion]] = []
    fleet.on_finished(finished.append)
    fleet.on_swap(swaps.append)
    try:
        with live_server(app) as srv:
            v1 = fleet.versions()[0]
            assert _complete(srv.url).headers[MODEL_HEADER] == v1.header
            old = fleet.production
            r = httpx.post(srv.url + "/admin/reload", timeout=60)
            assert r.status_code == 200 and r.json()["reloaded"] == []  # nothing moved
            _promote(reg_db, 2)
            r = httpx.post(srv.url + "/admin/reload", timeout=60)
            assert r.status_code == 200, r.text
            assert [v["key"] for v in r.json()["reloaded"]] == ["m:2"]
            got = _complete(srv.url, body={"user": "u"})
            assert got.status_code == 200 and got.headers[MODEL_HEADER].startswith("m:2@sha256:")
            deadline = time.monotonic() + 10
            while old.state.engine is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert old.state.engine is None and not old.state.bridge.alive  # freed
            # a reload to a version whose blob is gone: a clear 503, the old engine serves on
            _promote(reg_db, 3)
            r = httpx.post(srv.url + "/admin/reload", timeout=60)
            assert r.status_code == 503 and "model.safetensors" in r.json()["error"]["message"]
            assert _complete(srv.url).headers[MODEL_HEADER].startswith("m:2@")
            assert "reload_failures_total 1.0" in httpx.get(srv.url + "/metrics").text
    finally:
        _promote(reg_db, 1)
    deadline = time.monotonic() + 5
    while len(finished) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [f.version.key for f in finished[:3]] == ["m:1", "m:2", "m:2"]
    f = finished[1]
    assert f.status == 200 and f.completion_tokens == 3 and f.prompt_tokens >= 1
    assert f.user_hash == user_hash("u") and f.ttft_s is not None and f.latency_s >= f.ttft_s
    assert [[v.key for v in s] for s in swaps] == [["m:2"]]


def test_follow_polls_the_alias(reg_db: Path, live_server: Any) -> None:
    app = create_app("registry:m@production", _cfg(reg_db, follow=True, poll_seconds=0.1))
    try:
        with live_server(app) as srv:
            assert _complete(srv.url).headers[MODEL_HEADER].startswith("m:1@")
            _promote(reg_db, 2)
            deadline = time.monotonic() + 30
            while not _complete(srv.url).headers[MODEL_HEADER].startswith("m:2@"):
                assert time.monotonic() < deadline, "the alias move was not followed"
                time.sleep(0.1)
    finally:
        _promote(reg_db, 1)


def test_two_apps_share_nothing(reg_db: Path, tiny_model_dir: Path) -> None:
    a = create_app(str(tiny_model_dir), ENGINE)
    b = create_app("registry:m@production", _cfg(reg_db))
    fa, fb = a.state.fleet, b.state.fleet
    assert fa is not fb and fa.admission is not fb.admission
    assert fa.production.state.metrics.registry is not fb.production.state.metrics.registry
    assert fa.guard is not fb.guard
    v = fa.versions()[0]  # a plain dir: its name, no version, the weights' SHA-256
    assert v.key == "tiny-moe" and v.version is None and v.header.startswith("tiny-moe@sha256:")
    fa.close()
    fb.close()


@pytest.mark.parametrize(("ref", "extra", "needle"), [
    ("registry:nope@production", {}, "unknown model 'nope'"),
    ("registry:m@staging", {}, "alias m@staging points at no version"),
    ("registry:m@9", {}, "unknown version m@9"),
    ("registry:m@production", {"canary": "m@nothing", "canary_percent": 5}, "m@nothing"),
    ("registry:m@production", {"canary_percent": 5}, "--canary-percent needs --canary"),
    ("registry:m@broken", {}, "model.safetensors"),
])
def test_bad_refs_fail_with_one_line(reg_db: Path, ref: str, extra: dict[str, Any],
                                     needle: str) -> None:
    with pytest.raises(TrustmoeError) as e:
        Fleet(ref, _cfg(reg_db, **extra))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unreachable_registry_and_cli_errors(tmp_path: Path, reg_db: Path) -> None:
    with pytest.raises(TrustmoeError, match="no registry at"):
        Fleet("registry:m@production", _cfg(tmp_path / "none.db"))
    with pytest.raises(TrustmoeError, match=r"cannot connect|registry database"):
        Fleet("registry:m@production", ServeConfig(
            engine=ENGINE, registry_url="postgresql+psycopg://u:p@127.0.0.1:1/x"))
    r = CliRunner().invoke(cli_app, ["serve", "registry:nope@production", "--registry", str(reg_db)])
    assert isinstance(r.exception, TrustmoeError) and "unknown model 'nope'" in str(r.exception)
    r = CliRunner().invoke(cli_app, ["serve", "registry:m@production", "--registry", str(reg_db),
                                     "--canary-percent", "150"])
    assert isinstance(r.exception, TrustmoeError) and "0..100" in str(r.exception)


def test_reload_error_keeps_serving_in_process(reg_db: Path) -> None:
    fleet = Fleet("registry:m@production", _cfg(reg_db))
    try:
        fleet.start()
        _promote(reg_db, 3)
        with pytest.raises(ReloadError, match="still serving m:1@sha256:"):
            fleet.reload()
        assert fleet.versions()[0].key == "m:1" and fleet.ready
    finally:
        _promote(reg_db, 1)
        fleet.close()


def test_demo_serve_serves_the_demo_registry(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rich.console import Console

    from trustmoe.cli.demo import demo_serve_ref
    from trustmoe.cli.registry import register_demo

    rec = register_demo(tmp_path, tiny_model_dir, None, None, Console(file=None, quiet=True))
    ref, db = demo_serve_ref(rec)
    assert db == str(tmp_path / "registry.db")
    if rec["alias"] is None:  # no eval: the gates keep it out of production; serve the version
        assert ref == "registry:demo@1"
        reg = Registry.open(db)
        reg.promote("demo", 1, "production", why="test", force=True)
        reg.close()
        rec = {**rec, "alias": "production"}
        ref, db = demo_serve_ref(rec)
    assert ref == "registry:demo@production"
    fleet = Fleet(ref, ServeConfig(engine=ENGINE, registry_url=db))
    try:
        assert fleet.versions()[0].header.startswith("demo:1@sha256:")
    finally:
        fleet.close()
