"""The registry on both backends: versions, evidence, resolve, aliases in time, append-only
history, migrations."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from registry_helpers import make_eval, make_model, make_security, open_policy
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from conftest import Backend
from trustmoe.deploy.blobs import manifest_digest
from trustmoe.deploy.db import RegistryError
from trustmoe.deploy.records import NotFoundError
from trustmoe.deploy.registry import Registry
from trustmoe.deploy.schema import AliasEventRow, Base, FileRow, VersionRow
from trustmoe.io import sha256_file

OPEN = open_policy()


def test_add_records_evidence_and_digest(reg: Registry, tmp_path: Path) -> None:
    m = make_model(tmp_path / "m", seed=1)
    e = make_eval(tmp_path / "e", model=m, perplexity=11.5, ece=0.03, profile=True)
    s = make_security(tmp_path / "s", [{"severity": "low"}, {"severity": "medium"}])
    v = reg.add(m, "demo", eval_dir=e, security_dir=s, why="first try", by="ann@box")
    assert v.version == 1 and v.created_by == "ann@box" and v.why == "first try"
    files = sorted(p.name for p in m.iterdir())
    want = hashlib.sha256("".join(f"{sha256_file(m / f)}  {f}\n" for f in files).encode()).hexdigest()
    assert v.digest == want  # sha256sum-style manifest, sorted by path
    meta = v.metadata
    assert meta["dataset_manifest_sha256"] == "ab" * 32
    assert meta["train_args"] == {"lr": 0.001} and meta["training"]["preset"] == "tiny"
    assert meta["metrics"]["perplexity"] == 11.5 and meta["metrics"]["ece"] == 0.03
    assert meta["metrics"]["security_findings"] == 2
    assert meta["metrics"]["security_max_severity"] == "medium"
    assert meta["eval"]["has_profile"] is True
    assert "quantized_perplexity_delta" in meta["metrics_missing"]
    assert meta["files"]["model"]["count"] == 4
    # the whole eval dir is stored: profile files come back with the version
    r = reg.resolve("demo@1")
    assert r.eval_path is not None and (r.eval_path / "profile.safetensors").is_file()
    assert r.security_path is not None and (r.security_path / "security.json").is_file()


def test_versions_share_blobs_and_identical_add_is_not_duplicated(reg: Registry, tmp_path: Path
                                                                  ) -> None:
    m1 = make_model(tmp_path / "m1", seed=1)
    v1 = reg.add(m1, "demo")
    m2 = make_model(tmp_path / "m2", seed=2)  # same config/tokenizer, other weights
    v2 = reg.add(m2, "demo")
    assert (v1.version, v2.version) == (1, 2) and v1.digest != v2.digest
    assert len(reg.store.all_blobs()) == 4 + 2  # 4 files of v1, then only 2 changed files
    again = reg.add(m1, "demo")
    assert again.version == 1  # every file identical to v1: no new version
    assert [v.version for v in reg.versions("demo")] == [1, 2]


def test_resolve_gives_verified_read_only_shared_tree(reg: Registry, tmp_path: Path) -> None:
    m = make_model(tmp_path / "m")
    reg.add(m, "demo")
    reg.promote("demo", 1, "production", why="first", policy=OPEN)
    a = reg.resolve("registry:demo@production")
    b = reg.resolve("demo@1")
    assert a.path == b.path and a.path.name == a.digest  # content-addressed: one tree per digest
    assert (a.version, a.alias, b.alias) == (1, "production", None)
    for f in m.iterdir():
        assert (a.path / f.name).read_bytes() == f.read_bytes()
        assert not os.stat(a.path / f.name).st_mode & 0o222
    assert a.header() == f"demo@1 sha256:{a.digest}"
    import trustmoe.model.hf as hf  # the tree loads like any model dir (safetensors only)

    assert "model.embed_tokens.weight" in hf.read_safetensors(a.path)


def test_alias_history_in_time_and_search(reg: Registry, tmp_path: Path) -> None:
    for i in range(1, 4):
        reg.add(make_model(tmp_path / f"m{i}", seed=i), "demo")
    reg.add(make_model(tmp_path / "o", seed=9), "other")
    reg.promote("demo", 1, "production", why="v1", policy=OPEN)
    t1 = datetime.now(timezone.utc)
    time.sleep(0.01)
    reg.promote("demo", 2, "production", why="v2", policy=OPEN)
    t2 = datetime.now(timezone.utc)
    time.sleep(0.01)
    reg.promote("demo", 3, "canary", policy=OPEN)
    reg.promote("other", 1, "production", policy=OPEN)
    assert reg.alias_holder("demo", "production", t1).version == 1  # type: ignore[union-attr]
    assert reg.alias_holder("demo", "production", t2).version == 2  # type: ignore[union-attr]
    assert reg.alias_holder("demo", "production", t1 - timedelta(days=1)) is None
    assert reg.get("demo@production", t1).version == 1
    assert reg.get("demo").version == 3  # a bare name: the newest version
    assert reg.find_alias("production") == [("demo", 2), ("other", 1)]
    assert reg.find_alias("production", t1) == [("demo", 1)]
    assert reg.get("demo@2").aliases == ("production",)
    assert {m.name: m.aliases for m in reg.models()} == {
        "demo": {"canary": 3, "production": 2}, "other": {"production": 1}}
    with pytest.raises(NotFoundError, match="points at no version"):
        reg.get("demo@production", t1 - timedelta(days=1))


def test_rollback_steps_back_through_holders(reg: Registry, tmp_path: Path) -> None:
    for i in range(1, 4):
        reg.add(make_model(tmp_path / f"m{i}", seed=i), "demo", eval_dir=make_eval(
            tmp_path / f"e{i}", perplexity=10.0 - i))
        reg.promote("demo", i, "production")
    assert reg.rollback("demo", "production", "bad").event.version == 2
    assert reg.rollback("demo", "production").event.version == 1
    with pytest.raises(RegistryError, match="no earlier holder"):
        reg.rollback("demo", "production")
    hist = reg.history("demo", "production")
    assert [(e.seq, e.action, e.version, e.previous_version) for e in hist] == [
        (1, "promote", 1, None), (2, "promote", 2, 1), (3, "promote", 3, 2),
        (4, "rollback", 2, 3), (5, "rollback", 1, 2)]
    assert hist[3].why == "bad" and hist[3].gates["rolled_back_from"] == 3
    same = reg.promote("demo", 1, "production", policy=OPEN)
    assert not same.changed and same.event.seq == 5  # already there: nothing appended


def test_history_is_append_only_in_the_database(backend: Backend, reg: Registry, tmp_path: Path
                                                ) -> None:
    reg.add(make_model(tmp_path / "m"), "demo")
    reg.promote("demo", 1, "production", policy=OPEN)
    for stmt in ("UPDATE alias_events SET version = 7", "DELETE FROM alias_events",
                 "UPDATE model_versions SET digest = 'x'", "DELETE FROM version_files"):
        with reg.engine.connect() as conn, pytest.raises(Exception, match="append-only"):
            conn.execute(text(stmt))
            conn.commit()
    if backend.name == "postgres":
        with reg.engine.connect() as conn, pytest.raises(Exception, match="append-only"):
            conn.execute(text("TRUNCATE alias_events"))
    with Session(reg.engine) as s:
        assert s.execute(select(AliasEventRow.version)).scalars().all() == [1]


def test_schema_matches_models_and_migrations_are_idempotent(backend: Backend, reg: Registry
                                                             ) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        assert MigrationContext.configure(conn).get_current_heads() == ("0001",)
        assert {"models", "model_versions", "version_files", "alias_events"} <= set(
            inspect(conn).get_table_names())
    again = backend.open()  # a second open finds the schema current and the same registry id
    assert again.registry_id == reg.registry_id
    again.close()


def test_unknown_names_versions_aliases(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="registry is empty"):
        reg.get("nope")
    reg.add(make_model(tmp_path / "m"), "demo")
    with pytest.raises(NotFoundError, match=r"unknown model 'nope' \(known: demo\)"):
        reg.resolve("nope@1")
    with pytest.raises(NotFoundError, match=r"unknown version demo@5 \(versions 1\.\.1\)"):
        reg.get("demo@5")
    with pytest.raises(NotFoundError, match="points at no version"):
        reg.resolve("demo@production")
    with pytest.raises(NotFoundError, match="unknown version"):
        reg.promote("demo", 3, "production", policy=OPEN)
    for bad in ("de mo", "demo@Prod", "demo@0", "@1", "demo@"):
        with pytest.raises(RegistryError):
            reg.get(bad)


def test_records_naming_paths_outside_or_bad_blobs_are_refused(reg: Registry, tmp_path: Path
                                                               ) -> None:
    """A record altered in the database (inserted by hand) cannot make resolve read or write
    outside the blob store."""
    v = reg.add(make_model(tmp_path / "m"), "demo")
    entries = reg.files("demo", 1)
    for path, sha in (("../../escape.txt", entries[0].sha256), ("/etc/passwd", entries[0].sha256),
                      ("config.json", "../../../etc/passwd" + "0" * 45)):
        with Session(reg.engine) as s, s.begin():
            mid = s.execute(select(VersionRow.model_id)).scalar()
            n = s.execute(select(VersionRow.version).order_by(VersionRow.version.desc())).scalar()
            assert mid is not None and n is not None
            row = VersionRow(model_id=mid, version=n + 1, digest=v.digest, created_at=v.created_at,
                             created_by="x", why="", meta={})
            s.add(row)
            s.flush()
            s.add(FileRow(version_id=row.id, part="model", path=path, sha256=sha, size=1))
        with pytest.raises(RegistryError, match=r"outside the registry|invalid blob id"):
            reg.resolve(f"demo@{n + 1}")
    assert not (tmp_path / "escape.txt").exists()
    rep = reg.verify()
    assert len([p for p in rep.problems if "outside the registry" in p or "invalid blob" in p]) == 3


def test_digest_is_manifest_of_file_records(reg: Registry, tmp_path: Path) -> None:
    v = reg.add(make_model(tmp_path / "m"), "demo")
    assert manifest_digest(reg.files("demo", 1)) == v.digest
    assert reg.verify().ok
