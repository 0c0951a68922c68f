"""The database edge: URLs, migrations (Alembic, on open), foreign and newer databases."""

from __future__ import annotations

from pathlib import Path

import pg_server
import pytest
from registry_helpers import Backend
from sqlalchemy import inspect, text

import trustmoe.deploy.incidents  # noqa: F401  (its table is part of the registry schema)
from trustmoe.deploy import db
from trustmoe.deploy.db import RegistryError
from trustmoe.deploy.registry import Registry
from trustmoe.deploy.schema import Base


def test_schema_matches_models_and_migrations_are_idempotent(backend: Backend, reg: Registry
                                                             ) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        assert MigrationContext.configure(conn).get_current_heads() == ("0002",)
        assert {"models", "model_versions", "version_files", "alias_events", "incidents"} <= set(
            inspect(conn).get_table_names())
    again = backend.open()  # a second open finds the schema current and the same registry id
    assert again.registry_id == reg.registry_id
    again.close()


def test_url_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRUSTMOE_REGISTRY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert db.resolve_url(None) == f"sqlite:///{tmp_path}/.trustmoe/registry.db"
    monkeypatch.setenv("TRUSTMOE_REGISTRY", str(tmp_path / "x.db"))
    assert db.resolve_url(None) == f"sqlite:///{tmp_path}/x.db"
    assert db.resolve_url("postgresql://u:secret@h/db") == "postgresql+psycopg://u:secret@h/db"
    assert db.resolve_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert "secret" not in db.display_url("postgresql+psycopg://u:secret@h/db")
    assert db.sqlite_path(db.resolve_url("rel.db")) == Path.cwd() / "rel.db"
    with pytest.raises(RegistryError, match="unsupported registry backend"):
        db.make_engine("mysql://u@h/db")


def test_heads_read_without_alembic_match_alembic() -> None:
    from alembic.script import ScriptDirectory

    assert db._script_heads() == tuple(sorted(
        ScriptDirectory.from_config(db._alembic_config()).get_heads()))


def test_newer_schema_is_refused_untouched(backend: Backend) -> None:
    reg = backend.open()
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    reg.close()
    with pytest.raises(RegistryError, match="revision '9999', unknown to this trustmoe"):
        backend.open()
    engine = db.make_engine(db.resolve_url(backend.url))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "9999"
        assert "models" in inspect(conn).get_table_names()
    engine.dispose()


def test_missing_postgres_binaries_fail_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Postgres fixture does not skip: without binaries it fails naming the script."""
    monkeypatch.setattr(pg_server, "find_bin", lambda name: None)
    with pytest.raises(RuntimeError, match=r"services\.d/10-postgres\.sh"):
        pg_server.start()


def test_wal_switch_waits_for_a_writer_in_another_process(tmp_path: Path) -> None:
    # A second process mid-transaction (holding SQLite's RESERVED lock) makes the switch to
    # WAL answer "database is locked" at once, without the busy timeout: two processes opening a
    # new registry together hit this (CI, 2026-12-03). The switch must wait for the writer.
    import sqlite3
    import threading
    import time

    path = tmp_path / "r.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    done = threading.Timer(0.4, other.execute, args=("COMMIT",))
    done.start()
    start = time.monotonic()
    db.enable_wal(db.make_engine(f"sqlite:///{path}"))
    done.join()
    assert time.monotonic() - start >= 0.3  # it waited for the commit rather than failing
    fresh = sqlite3.connect(path)
    assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert fresh.execute("SELECT x FROM t").fetchall() == [(1,)]
    fresh.close()
    other.close()
