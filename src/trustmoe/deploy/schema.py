"""The registry's tables (SQLAlchemy 2.0 declarative models) and the public `Base`/`metadata`.

Other parts of `deploy` (monitoring's incidents, say) add their tables by subclassing `Base`
and shipping an Alembic migration in `trustmoe/deploy/migrations/versions/` whose
`down_revision` is the current head (see `migrations/README`).

    registry_info   one row: the registry's id (the blob store is stamped with it)
    models          a registered name
    model_versions  an immutable version: digest (SHA-256 over its file manifest), who, when,
                    why, metadata (dataset manifest SHA-256, training args, eval/security summaries)
    version_files   (version, part, path) -> blob SHA-256 and size; part is model|eval|security
    alias_events    the append-only alias history: (model, alias, seq) is unique, so two
                    writers that both read seq N can never both append seq N + 1

`model_versions`, `version_files` and `alias_events` are guarded by database triggers that
refuse UPDATE and DELETE (on SQLite and PostgreSQL alike): history is only ever appended to.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone: store naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the registry; use an aware UTC time")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise ValueError(f"not a timestamp: {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of every registry table; `Base.metadata` is Alembic's target."""


metadata = Base.metadata


class RegistryInfo(Base):
    __tablename__ = "registry_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    registry_id: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    created_by: Mapped[str] = mapped_column(String(300), nullable=False)


class VersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    digest: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    dataset_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    created_by: Mapped[str] = mapped_column(String(300), nullable=False)
    why: Mapped[str] = mapped_column(Text, nullable=False, default="")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, nullable=False)


class FileRow(Base):
    __tablename__ = "version_files"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    part: Mapped[str] = mapped_column(String(16), primary_key=True)
    path: Mapped[str] = mapped_column(String(1000), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AliasEventRow(Base):
    __tablename__ = "alias_events"
    __table_args__ = (UniqueConstraint("model_id", "alias", "seq", name="uq_alias_events_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), nullable=False, index=True)
    alias: Mapped[str] = mapped_column(String(100), nullable=False)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    action: Mapped[str] = mapped_column(String(16), nullable=False)  # promote | rollback
    forced: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    by: Mapped[str] = mapped_column(String(300), nullable=False)
    why: Mapped[str] = mapped_column(Text, nullable=False, default="")
    gates: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)


APPEND_ONLY_TABLES = ("model_versions", "version_files", "alias_events")
