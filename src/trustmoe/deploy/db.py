"""The registry database: URL rules, engine setup per backend, migrations, error translation.

    url            what it opens
    None           $TRUSTMOE_REGISTRY, else ~/.trustmoe/registry.db (SQLite)
    a path         that SQLite file
    sqlite:///...  SQLite (WAL journal, 30 s busy timeout, foreign keys on)
    postgresql://  PostgreSQL through psycopg 3 (`pip install 'trustmoe[postgres]'`)

`migrate` brings any database to the newest schema with Alembic, under a lock (SQLite's write
lock via BEGIN IMMEDIATE; a transaction-level advisory lock on PostgreSQL), so processes that
open a fresh registry at once do not race. Every database error reaches the user as one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from trustmoe.io import TrustmoeError

DEFAULT_DB = Path("~/.trustmoe/registry.db")
ENV_URL = "TRUSTMOE_REGISTRY"
MIGRATIONS = "trustmoe.deploy:migrations"
_PG_LOCK_KEY = 0x7472_7573  # "trus": one advisory lock id for schema migrations


class RegistryError(TrustmoeError):
    """A registry problem with one clear, user-facing message."""


class ConflictError(RegistryError):
    """Another writer changed the registry between our read and our write (nothing was written)."""


def resolve_url(url: str | os.PathLike[str] | None) -> str:
    """The SQLAlchemy URL for `url` (None: $TRUSTMOE_REGISTRY or the default SQLite file)."""
    raw = str(url) if url is not None else os.environ.get(ENV_URL) or str(DEFAULT_DB)
    if "://" not in raw:
        return "sqlite:///" + str(Path(raw).expanduser().absolute())
    if raw.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + raw.split("://", 1)[1]
    try:
        make_url(raw)
    except (sa_exc.ArgumentError, ValueError):
        raise RegistryError(f"not a database URL or path: {raw!r}") from None
    return raw


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other backends and for in-memory databases)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def display_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and BEGIN (IMMEDIATE) control."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "postgresql":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise RegistryError("a PostgreSQL registry needs its driver: pip install "
                                "'trustmoe[postgres]'") from None
        return create_engine(url, pool_pre_ping=True)
    if backend != "sqlite":
        raise RegistryError(f"unsupported registry backend {backend!r}: use a SQLite path or "
                            "a postgresql:// URL")
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()  # WAL is switched on by Registry.open once the file is known to be ours

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine, but its transactions take SQLite's write lock at BEGIN."""
    return engine.execution_options(sqlite_immediate=True)


@lru_cache(maxsize=1)
def _script_heads() -> tuple[str, ...]:
    """The newest revision(s), read from the migration scripts' `revision`/`down_revision`
    assignments without importing Alembic (0.4 s of every CLI call otherwise)."""
    import ast

    revs: set[str] = set()
    downs: set[str] = set()
    for f in sorted((Path(__file__).parent / "migrations" / "versions").glob("*.py")):
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            target: ast.expr
            if isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            else:
                continue
            if not isinstance(target, ast.Name):
                continue
            if target.id == "revision":
                revs.add(ast.literal_eval(value))
            elif target.id == "down_revision":
                down = ast.literal_eval(value)
                downs.update([down] if isinstance(down, str) else down or [])
    return tuple(sorted(revs - downs))


def _alembic_config(connection: Connection | None = None, url: str | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _current_heads(conn: Connection) -> tuple[str, ...]:
    if not inspect(conn).has_table("alembic_version"):
        return ()
    return tuple(sorted(conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars()))


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema (a no-op, one query, when it already is)."""
    heads = _script_heads()
    with engine.connect() as conn:
        current = _current_heads(conn)
        conn.rollback()
    if set(current) == set(heads):
        return
    _check_known(current, heads, engine)
    from alembic import command
    from alembic.script import ScriptDirectory

    if set(ScriptDirectory.from_config(_alembic_config()).get_heads()) != set(heads):
        raise RegistryError("trustmoe's registry migrations are inconsistent (several heads?)")

    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
        current = _current_heads(conn)  # someone may have migrated while we waited
        if set(current) != set(heads):
            if not current:
                foreign = set(inspect(conn).get_table_names()) - {"alembic_version"}
                if foreign:
                    raise RegistryError(
                        f"{display_url(str(engine.url))} is not a trustmoe registry: it holds "
                        f"other tables ({', '.join(sorted(foreign)[:3])}) and no registry schema")
            command.upgrade(_alembic_config(conn), "head")


def _check_known(current: tuple[str, ...], heads: tuple[str, ...], engine: Engine) -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    for rev in current:
        try:
            if script.get_revision(rev) is None:
                raise KeyError(rev)
        except Exception:
            raise RegistryError(
                f"{display_url(str(engine.url))} has registry schema revision {rev!r}, unknown "
                f"to this trustmoe (newest known: {', '.join(heads)}): upgrade trustmoe") from None


_LOCKED = re.compile(r"locked|busy", re.I)


def enable_wal(engine: Engine) -> None:
    """SQLite's WAL journal (readers never wait for a writer); set outside any BEGIN, and only
    once the file is known to be a registry (it rewrites the file header)."""
    raw = engine.raw_connection()
    deadline = time.monotonic() + 30
    try:
        cur = raw.cursor()
        while True:
            try:
                if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    cur.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as e:
                # the switch needs the file to itself; where another process holds a lock that
                # would deadlock with ours, SQLite answers "locked" at once, without the busy
                # timeout: wait as the timeout would have (two processes opening a new registry)
                if not _LOCKED.search(str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        cur.close()
    finally:
        raw.close()


def registry_id(engine: Engine) -> str:
    """The registry's id, made on first open (the blob store is stamped with it)."""
    import uuid
    from datetime import datetime, timezone

    from sqlalchemy.orm import Session

    from trustmoe.deploy.schema import RegistryInfo

    with Session(engine) as s:
        row = s.get(RegistryInfo, 1)
        if row is not None:
            return row.registry_id
    try:
        with Session(writer(engine)) as s, s.begin():
            s.add(RegistryInfo(id=1, registry_id=uuid.uuid4().hex,
                               created_at=datetime.now(timezone.utc)))
    except sa_exc.IntegrityError:
        pass  # another process stamped it first
    with Session(engine) as s:
        row = s.get(RegistryInfo, 1)
        if row is None:
            raise RegistryError(f"{display_url(str(engine.url))}: the registry id cannot be stored")
        return row.registry_id


_CORRUPT = re.compile(r"file is not a database|malformed|not a database|no such table|"
                      r"no such column|undefinedtable|does not exist", re.I)


def _first_line(e: sa_exc.DBAPIError) -> str:
    text = str(e.orig if e.orig is not None else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn database errors into one-line RegistryErrors naming the database."""
    where = display_url(url)
    try:
        yield
    except RegistryError:
        raise
    except sa_exc.IntegrityError:
        raise  # the caller's conflict handling decides what a duplicate key means
    except sa_exc.DBAPIError as e:
        msg = _first_line(e)
        if "append-only" in msg:
            raise RegistryError(f"refused by the database: {msg}") from None
        if "database is locked" in msg or "could not obtain lock" in msg:
            raise ConflictError(f"registry {where} is busy (another writer held it for 30 s): "
                                "nothing was written; try again") from None
        if _CORRUPT.search(msg):
            raise RegistryError(f"registry database {where} is unreadable or corrupt: {msg}") from None
        if "unable to open database" in msg or "readonly" in msg or "permission denied" in msg.lower():
            raise RegistryError(f"cannot open registry database {where}: {msg}") from None
        if isinstance(e, sa_exc.OperationalError) and "connect" in msg.lower():
            raise RegistryError(f"cannot connect to registry database {where}: {msg}") from None
        raise RegistryError(f"registry database {where}: {msg}") from None
    except (ValueError, TypeError, KeyError) as e:
        # a row whose JSON or timestamp cannot be decoded
        raise RegistryError(f"registry database {where} holds a corrupt record: {e}") from None


if __name__ == "__main__":  # pragma: no cover - a developer tool for writing migrations
    import argparse

    from alembic import command as _cmd

    ap = argparse.ArgumentParser(description="Draft a registry migration with Alembic autogenerate.")
    ap.add_argument("action", choices=["revision"])
    ap.add_argument("-m", "--message", required=True)
    ap.add_argument("--url", required=True, help="a scratch database at the current head")
    a = ap.parse_args()
    _cmd.revision(_alembic_config(url=resolve_url(a.url)), message=a.message, autogenerate=True)
