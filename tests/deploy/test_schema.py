"""The schema: append-only history enforced by the database itself, UTC timestamps."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from registry_helpers import Backend, make_model, open_policy
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from trustmoe.deploy.registry import Registry
from trustmoe.deploy.schema import AliasEventRow, RegistryInfo

OPEN = open_policy()


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


def test_timestamps_are_aware_utc(reg: Registry, tmp_path: Path) -> None:
    v = reg.add(make_model(tmp_path / "m"), "demo")
    assert v.created_at.utcoffset() is not None and v.created_at.utcoffset().total_seconds() == 0
    back = reg.get("demo@1").created_at
    assert back == v.created_at  # microseconds survive the round trip on both backends
    with Session(reg.engine) as s, pytest.raises(Exception, match="naive datetime"):
        s.add(RegistryInfo(id=2, registry_id="x", created_at=datetime(2026, 1, 1)))
        s.flush()
