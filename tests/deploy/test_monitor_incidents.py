"""Incidents in the registry database (SQLite and a real PostgreSQL, through the registry's
Alembic migrations): stored, updated, listed, found by prefix, acknowledged; and the actions
`RegistrySink` takes through the registry (alias rollback in its history) and the canary."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_helpers import Backend, make_model, open_policy
from sqlalchemy import inspect

from trustmoe.deploy.incidents import (
    Incident,
    IncidentStore,
    MemorySink,
    RegistrySink,
    hash_request_id,
    registry_url,
)
from trustmoe.deploy.registry import Registry
from trustmoe.io import TrustmoeError


def _incident(detector: str = "tokens", version: str = "demo:1", action: str = "rollback_canary",
              **kw: object) -> Incident:
    return Incident(detector=detector, version=version, statistic=0.4, threshold=0.2, direction="above",
                    effect=0.4, floor=0.1, explanation="PSI 0.4", window={"size": 100}, consecutive=2,
                    action=action, digest="ab" * 32, dataset_manifest_sha256="cd" * 32,
                    profile_ref="evals/x#sha256:" + "ef" * 32, sample_request_ids=[hash_request_id("r1")],
                    details={"band": "major shift", "p": float("nan")}, **kw)  # type: ignore[arg-type]


def test_registry_url_conventions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTMOE_REGISTRY", str(tmp_path / "r" / "reg.db"))
    assert registry_url() == f"sqlite:///{tmp_path / 'r' / 'reg.db'}" and (tmp_path / "r").is_dir()
    assert registry_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert registry_url("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.delenv("TRUSTMOE_REGISTRY")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry_url() == f"sqlite:///{tmp_path / '.trustmoe' / 'registry.db'}"


def test_store_update_list_get_ack(backend: Backend, tmp_path: Path) -> None:
    reg = backend.open()  # a registry with a version in it: incidents live beside it
    reg.add(make_model(tmp_path / "m1"), "demo")
    st = IncidentStore(backend.url)
    a, b = _incident(opened_at=100.0), _incident("slo.max_error_rate", "demo:2", opened_at=200.0)
    st.store(a)
    st.store(b)
    a.action_result = "canary demo:1 set to 0%"
    st.store(a)  # update, not a second row
    got = st.list()
    assert [i.id for i in got] == [b.id, a.id]
    assert got[1].action_result == "canary demo:1 set to 0%" and got[1].details["p"] is None
    assert got[1].dataset_manifest_sha256 == "cd" * 32 and got[1].to_dict() == a.to_dict() | {
        "details": {"band": "major shift", "p": None}}
    assert [i.id for i in st.list(version="demo:2")] == [b.id]
    assert st.get(a.id[:6]).id == a.id
    acked = st.ack(a.id, by="ops")
    assert acked.status == "acked" and acked.acked_by == "ops" and acked.acked_at
    assert [i.id for i in st.list(status="open")] == [b.id]
    with pytest.raises(TrustmoeError, match="already acknowledged"):
        st.ack(a.id)
    with pytest.raises(TrustmoeError, match="no incident"):
        st.get("zzzz")
    with pytest.raises(TrustmoeError, match="no incident"):
        st.get("%")  # LIKE wildcards are not wildcards here
    rows = {(r["version"], r["status"]): r["count"] for r in st.counts()["rows"]}
    assert rows == {("demo:1", "acked"): 1, ("demo:2", "open"): 1}
    with reg.engine.connect() as c:  # the registry's migrations made the table
        assert "incidents" in inspect(c).get_table_names()
        assert c.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0002"
    st.close()
    assert [v.version for v in reg.versions("demo")] == [1]  # the registry is untouched
    reg.close()
    again = IncidentStore(backend.url)  # reopened: kept
    assert again.list(limit=1)[0].id == b.id
    again.close()


def test_store_on_an_open_registry_and_a_fresh_database(backend: Backend) -> None:
    st = IncidentStore(backend.url)  # a fresh database: the whole registry schema is made
    st.store(_incident(id="x1"))
    st.close()
    reg = backend.open()  # ... and the registry opens it as its own
    shared = IncidentStore(reg)
    assert shared.get("x1").detector == "tokens"
    shared.close()  # does not dispose of the registry's engine
    assert reg.models() == []
    reg.close()


def test_ambiguous_prefix_and_bad_urls(tmp_path: Path) -> None:
    st = IncidentStore(str(tmp_path / "r.db"))
    st.store(_incident(id="abc111"))
    st.store(_incident(id="abc222"))
    with pytest.raises(TrustmoeError, match="ambiguous"):
        st.get("abc")
    with pytest.raises(TrustmoeError, match="unsupported registry backend"):
        IncidentStore("nosuchdriver://x/y")
    (tmp_path / "foreign.db").write_bytes(b"")
    import sqlite3

    with sqlite3.connect(tmp_path / "foreign.db") as c:
        c.execute("CREATE TABLE versions (name TEXT)")
    with pytest.raises(TrustmoeError, match="not a trustmoe registry"):
        IncidentStore(str(tmp_path / "foreign.db"))  # someone else's database is left alone


def _three_versions(reg: Registry, tmp_path: Path) -> None:
    for i in (1, 2, 3):
        reg.add(make_model(tmp_path / f"m{i}", seed=i), "demo")
    reg.promote("demo", 1, "production", why="v1", policy=open_policy())
    reg.promote("demo", 2, "production", why="v2", policy=open_policy())


def test_registry_sink_rolls_production_back_in_the_alias_history(backend: Backend, tmp_path: Path
                                                                   ) -> None:
    reg = backend.open()
    _three_versions(reg, tmp_path)
    reloads: list[int] = []
    sink = RegistrySink(IncidentStore(reg), reg, after_rollback=lambda: reloads.append(1))
    inc = _incident(version="demo@2", role="production", model="demo", alias="production",
                    action="rollback_production")
    sink.store(inc)
    r = sink.act(inc)
    assert r.performed and r.message == "alias demo@production rolled back v2 -> v1 (alias history #3)"
    assert reloads == [1]
    last = reg.history("demo", "production")[-1]
    assert (last.action, last.version, last.previous_version, last.by) == ("rollback", 1, 2, "trustmoe-monitor")
    assert last.why.startswith(f"incident {inc.id}: tokens 0.4 crossed 0.2 on demo@2")
    # the alias has moved on (now v1): a second incident of v2 changes nothing
    again = sink.act(_incident(version="demo@2", role="production", model="demo", alias="production",
                               action="rollback_production"))
    assert not again.performed and "now holds v1, not demo@2" in again.message
    assert len(reg.history("demo", "production")) == 3 and reloads == [1]
    reg.close()


def test_registry_sink_canary_and_refusals(backend: Backend, tmp_path: Path) -> None:
    reg = backend.open()
    _three_versions(reg, tmp_path)
    percents: list[float] = []
    sink = RegistrySink(IncidentStore(reg), reg, set_canary_percent=percents.append)
    canary = _incident(version="demo@3", role="canary", model="demo", alias=None)
    assert sink.act(canary).message == "canary demo@3 set to 0% of traffic" and percents == [0.0]
    canary.action = "rollback_production"  # a bad canary never rolls production back
    assert sink.act(canary).performed and percents == [0.0, 0.0]
    prod = _incident(version="demo@2", role="production", model="demo", alias="production")
    r = sink.act(prod)  # rollback_canary on the production version: refused, said why
    assert not r.performed and "not a canary" in r.message
    prod.action = "notify"
    assert sink.act(prod).message == "notify only"
    prod.action, prod.alias = "rollback_production", None
    assert "not served from a registry alias" in sink.act(prod).message
    assert len(reg.history("demo", "production")) == 2  # nothing rolled back
    v1_only = RegistrySink(IncidentStore(reg), reg)
    first = _incident(version="demo@1", role="production", model="demo", alias="canary",
                      action="rollback_production")
    r = v1_only.act(first)  # demo@canary holds nothing
    assert not r.performed and "holds nothing" in r.message
    reg.close()


def test_memory_sink_is_a_dry_run() -> None:
    sink = MemorySink()
    inc = _incident()
    sink.store(inc)
    r = sink.act(inc)
    assert not r.performed and r.message == "dry run: would roll the canary back to 0%"
    inc.action = "notify"
    assert sink.act(inc).message == "notify only"
