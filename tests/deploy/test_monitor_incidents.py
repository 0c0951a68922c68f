"""Incidents in the registry database: stored, updated, listed, found by prefix, acknowledged."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from trustmoe.deploy.incidents import Incident, IncidentStore, MemorySink, hash_request_id, registry_url
from trustmoe.io import TrustmoeError


def _incident(detector: str = "tokens", version: str = "demo:1", **kw: object) -> Incident:
    return Incident(detector=detector, version=version, statistic=0.4, threshold=0.2, direction="above",
                    effect=0.4, floor=0.1, explanation="PSI 0.4", window={"size": 100}, consecutive=2,
                    action="rollback_canary", digest="ab" * 32, dataset_manifest_sha256="cd" * 32,
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


def test_store_update_list_get_ack(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    eng = sa.create_engine(f"sqlite:///{db}")  # the registry's own tables are left alone
    with eng.begin() as c:
        c.execute(sa.text("CREATE TABLE versions (name TEXT PRIMARY KEY)"))
        c.execute(sa.text("INSERT INTO versions VALUES ('demo:1')"))
    st = IncidentStore(str(db))
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
    st.close()
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT name FROM versions")).scalar() == "demo:1"
    assert IncidentStore(str(db)).list(limit=1)[0].id == b.id  # reopened: kept


def test_ambiguous_prefix_and_bad_urls(tmp_path: Path) -> None:
    st = IncidentStore(str(tmp_path / "r.db"))
    st.store(_incident(id="abc111"))
    st.store(_incident(id="abc222"))
    with pytest.raises(TrustmoeError, match="ambiguous"):
        st.get("abc")
    with pytest.raises(TrustmoeError, match="cannot"):
        IncidentStore("nosuchdriver://x/y")


def test_memory_sink_is_a_dry_run() -> None:
    sink = MemorySink()
    inc = _incident()
    sink.store(inc)
    r = sink.act(inc)
    assert not r.performed and r.message == "dry run: would roll the canary back to 0%"
    inc.action = "notify"
    assert sink.act(inc).message == "notify only"
