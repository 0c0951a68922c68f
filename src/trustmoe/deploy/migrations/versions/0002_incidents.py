"""Monitoring incidents in the registry database (`trustmoe.deploy.incidents.IncidentRow`).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("opened_at", sa.Float, nullable=False),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("version", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("action_result", sa.Text, nullable=True),
        sa.Column("statistic", sa.Float, nullable=True),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("digest", sa.String(64), nullable=True),
        sa.Column("dataset_manifest_sha256", sa.String(64), nullable=True),
        sa.Column("payload", sa.Text, nullable=False),
    )
    op.create_index("ix_incidents_opened_at", "incidents", ["opened_at"])
    op.create_index("ix_incidents_version", "incidents", ["version"])
    op.create_index("ix_incidents_status", "incidents", ["status"])


def downgrade() -> None:
    op.drop_table("incidents")
