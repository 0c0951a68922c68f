"""Registry fixtures: every backend-parametrized test runs on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pg_server
import pytest
from registry_helpers import Backend

from trustmoe.deploy.registry import Registry


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_server.PgServer]:
    try:
        server = pg_server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "registry.db"), tmp_path / "blobs")
    server: pg_server.PgServer = request.getfixturevalue("pg")
    return Backend("postgres", server.create_db(), tmp_path / "blobs")


@pytest.fixture
def reg(backend: Backend) -> Iterator[Registry]:
    r = backend.open()
    yield r
    r.close()
