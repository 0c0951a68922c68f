"""Alembic environment of the registry: runs on the connection `deploy.db.migrate` hands over
(`config.attributes["connection"]`), or on `sqlalchemy.url` when run from the command line."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from trustmoe.deploy import schema


def _import_models() -> None:
    """Import every module that declares tables on `schema.Base`, so autogenerate sees them."""
    import trustmoe.deploy.incidents  # noqa: F401  (table incidents)


_import_models()
config = context.config
target_metadata = schema.Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata,
                          render_as_batch=conn.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()


run()
