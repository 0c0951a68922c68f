"""Alembic migrations of the registry database (run programmatically by `deploy.db.migrate`)."""
