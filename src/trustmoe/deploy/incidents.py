"""Incidents: what the monitor opens on an alarm, where they are kept, and who acts on them.

An `Incident` carries the chain back to its origins (model version and weights digest, the
dataset manifest SHA-256 the model was trained on, the profile it drifted from), the numbers
that opened it, a plain-words explanation, and hashed ids of sample requests (raw prompts
only when the policy says `log_prompts`).

`IncidentSink` is the edge to the server: `store` keeps an incident (insert or update by id),
`act` carries out its action (roll the canary back to 0%, roll the production alias back) and
says what happened. `MemorySink` is the dry run `trustmoe monitor replay` uses;
`IncidentStore` keeps incidents in the registry database (table `incidents`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trustmoe.io import TrustmoeError

DEFAULT_REGISTRY = "~/.trustmoe/registry.db"


def hash_request_id(request_id: str) -> str:
    """The id an incident keeps for a request: 16 hex digits of its SHA-256."""
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:16]


@dataclass
class Incident:
    detector: str  # "tokens" | "scalars" | "hidden" | "routing" | "slo.<limit>"
    version: str
    statistic: float
    threshold: float
    direction: str  # "above" | "below"
    effect: float
    floor: float
    explanation: str  # the detector's explain() + this window's summary, for people
    window: dict[str, Any]  # index, size, first/last request number, start/end time
    consecutive: int  # windows in a row that crossed
    action: str  # what the policy asks: notify | rollback_canary | rollback_production
    digest: str | None = None  # model weights sha256
    dataset_manifest_sha256: str | None = None
    profile_ref: str | None = None  # "<eval dir>#sha256:<profile.safetensors sha256>"
    sample_request_ids: list[str] = field(default_factory=list)  # hash_request_id of each
    prompts: list[str] | None = None  # only with log_prompts
    details: dict[str, Any] = field(default_factory=dict)
    action_result: str | None = None  # what `IncidentSink.act` reported
    status: str = "open"  # open | acked
    acked_at: float | None = None
    acked_by: str | None = None
    opened_at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Incident:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and x != x:  # NaN
        return None
    if hasattr(x, "item"):  # numpy scalars
        return _json_safe(x.item())
    return x


@dataclass
class ActionResult:
    performed: bool
    message: str  # e.g. "canary demo:4 set to 0% (alias history #12)" or why nothing was done


class IncidentSink(Protocol):
    """What the server implements against the registry (see the module docstring)."""

    def store(self, incident: Incident) -> None: ...

    def act(self, incident: Incident) -> ActionResult: ...


class MemorySink:
    """Keeps incidents in memory and performs no action (dry run: replay, tests)."""

    def __init__(self) -> None:
        self.incidents: dict[str, Incident] = {}

    def store(self, incident: Incident) -> None:
        self.incidents[incident.id] = incident

    def act(self, incident: Incident) -> ActionResult:
        if incident.action == "notify":
            return ActionResult(False, "notify only")
        what = {"rollback_canary": "roll the canary back to 0%",
                "rollback_production": "roll the production alias back to its previous version"}
        return ActionResult(False, f"dry run: would {what.get(incident.action, incident.action)}")


def registry_url(url: str | None = None) -> str:
    """SQLAlchemy URL of the registry database: `url`, else $TRUSTMOE_REGISTRY, else
    ~/.trustmoe/registry.db. A value without '://' is a SQLite file path."""
    u = url or os.environ.get("TRUSTMOE_REGISTRY") or DEFAULT_REGISTRY
    if "://" in u:
        if u.startswith(("postgres://", "postgresql://")):  # psycopg 3, as the registry uses
            return "postgresql+psycopg://" + u.split("://", 1)[1]
        return u
    p = Path(u).expanduser().absolute()
    p.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p}"


class IncidentStore:
    """Incidents in the registry database, table `incidents` (created if missing).

    The searchable fields are columns; the whole incident is also kept as JSON in `payload`,
    so fields added later need no migration to be stored.
    """

    def __init__(self, url: str | None = None) -> None:
        import sqlalchemy as sa

        self.url = registry_url(url)
        try:
            self.engine = sa.create_engine(self.url)
        except (sa.exc.ArgumentError, ImportError) as e:
            raise TrustmoeError(f"cannot use registry database {self.url!r}: {e}") from None
        md = sa.MetaData()
        self.table = sa.Table(
            "incidents", md,
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("opened_at", sa.Float, nullable=False, index=True),
            sa.Column("detector", sa.String(64), nullable=False),
            sa.Column("version", sa.String(256), nullable=False, index=True),
            sa.Column("status", sa.String(16), nullable=False, index=True),
            sa.Column("action", sa.String(32), nullable=False),
            sa.Column("statistic", sa.Float),
            sa.Column("threshold", sa.Float),
            sa.Column("digest", sa.String(64)),
            sa.Column("dataset_manifest_sha256", sa.String(64)),
            sa.Column("payload", sa.Text, nullable=False),
        )
        self.sa = sa
        try:
            md.create_all(self.engine, checkfirst=True)
        except sa.exc.OperationalError as e:
            raise TrustmoeError(f"cannot open registry database {self.url}: {e.orig}") from None

    def store(self, incident: Incident) -> None:
        d = incident.to_dict()
        row = {k: d[k] for k in ("id", "opened_at", "detector", "version", "status", "action",
                                 "statistic", "threshold", "digest", "dataset_manifest_sha256")}
        row["payload"] = json.dumps(d, sort_keys=True)
        t = self.table
        with self.engine.begin() as c:
            if c.execute(self.sa.select(t.c.id).where(t.c.id == incident.id)).first():
                c.execute(t.update().where(t.c.id == incident.id).values(**row))
            else:
                c.execute(t.insert().values(**row))

    def act(self, incident: Incident) -> ActionResult:
        return ActionResult(False, "the incident store records incidents; it does not act")

    def list(self, *, status: str | None = None, version: str | None = None, limit: int = 50) -> list[Incident]:
        t = self.table
        q = self.sa.select(t.c.payload).order_by(t.c.opened_at.desc()).limit(limit)
        if status:
            q = q.where(t.c.status == status)
        if version:
            q = q.where(t.c.version == version)
        with self.engine.connect() as c:
            return [Incident.from_dict(json.loads(r[0])) for r in c.execute(q)]

    def get(self, incident_id: str) -> Incident:
        t = self.table
        with self.engine.connect() as c:
            rows = c.execute(self.sa.select(t.c.payload).where(t.c.id.startswith(incident_id, autoescape=True))).all()
        if not rows:
            raise TrustmoeError(f"no incident {incident_id!r} in {self.url}")
        if len(rows) > 1:
            raise TrustmoeError(f"incident id {incident_id!r} is ambiguous ({len(rows)} match); give more digits")
        return Incident.from_dict(json.loads(rows[0][0]))

    def ack(self, incident_id: str, by: str | None = None) -> Incident:
        inc = self.get(incident_id)
        if inc.status == "acked":
            raise TrustmoeError(f"incident {inc.id} was already acknowledged")
        inc.status, inc.acked_at, inc.acked_by = "acked", time.time(), by
        self.store(inc)
        return inc

    def counts(self) -> dict[str, Any]:
        """Open and acknowledged incidents per version and detector."""
        t = self.table
        q = self.sa.select(t.c.version, t.c.detector, t.c.status, self.sa.func.count(),
                           self.sa.func.max(t.c.opened_at)).group_by(t.c.version, t.c.detector, t.c.status)
        with self.engine.connect() as c:
            rows = c.execute(q).all()
        return {"rows": [{"version": v, "detector": d, "status": s, "count": n, "last_opened_at": last}
                         for v, d, s, n, last in rows]}

    def close(self) -> None:
        self.engine.dispose()
