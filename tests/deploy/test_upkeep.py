"""verify and gc: every blob re-hashed, tampered records found, orphans removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from registry_helpers import make_model, open_policy
from sqlalchemy import select
from sqlalchemy.orm import Session

from trustmoe.deploy.db import RegistryError
from trustmoe.deploy.registry import Registry
from trustmoe.deploy.schema import AliasEventRow, FileRow, VersionRow

OPEN = open_policy()


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


def test_verify_finds_changed_blobs_and_history_gaps(reg: Registry, tmp_path: Path) -> None:
    reg.add(make_model(tmp_path / "m1", seed=1), "demo")
    reg.add(make_model(tmp_path / "m2", seed=2), "demo")
    reg.promote("demo", 1, "production", policy=OPEN)
    rep = reg.verify()
    assert rep.ok and rep.versions == 2 and rep.blobs_checked == 6  # shared files hashed once
    weights = next(e for e in reg.files("demo", 2) if e.path == "model.safetensors")
    blob = reg.store.blob_path(weights.sha256)
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    with Session(reg.engine) as s, s.begin():  # an entry inserted out of sequence, by hand
        first = s.execute(select(AliasEventRow)).scalar_one()
        s.add(AliasEventRow(model_id=first.model_id, alias="production", seq=5, version=9,
                            previous_version=1, action="promote", forced=False, at=first.at,
                            by="intruder", why="", gates={}))
    problems = reg.verify().problems
    assert len(problems) == 3, problems
    assert "demo@2 model: file model.safetensors" in problems[0] and "has changed" in problems[0]
    assert "entry 5" in problems[1] and "follows entry 1" in problems[1]
    assert "points at v9, which does not exist" in problems[2]


def test_gc_keeps_referenced_and_young_files(reg: Registry, tmp_path: Path) -> None:
    reg.add(make_model(tmp_path / "m1", seed=1), "demo")
    orphan = tmp_path / "orphan.bin.txt"
    orphan.write_bytes(b"left by an interrupted add")
    sha, _ = reg.store.put(orphan)
    assert reg.gc().blobs_removed == 0  # within the grace period
    rep = reg.gc(grace_s=0)
    assert rep.blobs_removed == 1 and sha not in reg.store.all_blobs()
    assert reg.verify().ok and reg.resolve("demo@1").path.is_dir()
    with pytest.raises(RegistryError):
        reg.resolve("demo@2")
