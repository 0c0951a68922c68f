"""Incidents: what the monitor opens on an alarm, where they are kept, and who acts on them.

An `Incident` carries the chain back to its origins (model version and weights digest, the
dataset manifest SHA-256 the model was trained on, the profile it drifted from), the numbers
that opened it, a plain-words explanation, and hashed ids of sample requests (raw prompts
only when the policy says `log_prompts`).

`IncidentSink` is the edge to the server: `store` keeps an incident (insert or update by id),
`act` carries out its action (roll the canary back to 0%, roll the production alias back) and
says what happened. `MemorySink` is the dry run `trustmoe monitor replay` uses;
`IncidentStore` keeps incidents in the registry database (table `incidents`, created by the
registry's Alembic migration 0002); `RegistrySink` stores there and acts through the registry
(`Registry.rollback`, recorded in the alias history) and the server's canary setting.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Float, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from trustmoe.deploy import db
from trustmoe.deploy.schema import Base
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.deploy.registry import Registry


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
    role: str | None = None  # the version's role when it was served: production | canary | ...
    model: str | None = None  # registry model name of the version (None outside a registry)
    alias: str | None = None  # registry alias it was served under, e.g. "production"
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


class IncidentRow(Base):
    """Table `incidents`: searchable fields as columns, the whole incident as JSON in `payload`
    (fields added later need no migration to be stored). Not append-only: acks update rows."""

    __tablename__ = "incidents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    opened_at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    detector: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[str] = mapped_column(String(256), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    action_result: Mapped[str | None] = mapped_column(Text, nullable=True)
    statistic: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dataset_manifest_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payload: Mapped[str] = mapped_column(Text, nullable=False)


def registry_url(url: str | None = None) -> str:
    """SQLAlchemy URL of the registry database (`trustmoe.deploy.db.resolve_url`: `url`, else
    $TRUSTMOE_REGISTRY, else ~/.trustmoe/registry.db); a SQLite file's folder is created."""
    u = db.resolve_url(url)
    path = db.sqlite_path(u)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return u


class IncidentStore:
    """Incidents in the registry database (any URL the registry takes; migrated on open)."""

    def __init__(self, url: str | Registry | None = None) -> None:
        if url is not None and not isinstance(url, str):  # a Registry already open
            self.url, self.engine, self._own = url.url, url.engine, False
            return
        try:
            self.url = registry_url(url)
            self.engine = db.make_engine(self.url)
        except (ValueError, ImportError, OSError) as e:  # bad URL, missing driver, no folder
            if isinstance(e, TrustmoeError):
                raise TrustmoeError(f"cannot use registry database: {e}") from None
            raise TrustmoeError(f"cannot use registry database {url!r}: {e}") from None
        self._own = True
        with db.translate_errors(self.url):
            db.migrate(self.engine)
            if db.sqlite_path(self.url) is not None:
                db.enable_wal(self.engine)

    def store(self, incident: Incident) -> None:
        d = incident.to_dict()
        fields = {k: d[k] for k in ("opened_at", "detector", "version", "status", "action", "action_result",
                                    "statistic", "threshold", "digest", "dataset_manifest_sha256")}
        fields["payload"] = json.dumps(d, sort_keys=True)
        with db.translate_errors(self.url), Session(db.writer(self.engine)) as s, s.begin():
            row = s.get(IncidentRow, incident.id)
            if row is None:
                s.add(IncidentRow(id=incident.id, **fields))
            else:
                for k, v in fields.items():
                    setattr(row, k, v)

    def act(self, incident: Incident) -> ActionResult:
        return ActionResult(False, "the incident store records incidents; it does not act")

    def list(self, *, status: str | None = None, version: str | None = None, limit: int = 50) -> list[Incident]:
        q = select(IncidentRow.payload).order_by(IncidentRow.opened_at.desc()).limit(limit)
        if status:
            q = q.where(IncidentRow.status == status)
        if version:
            q = q.where(IncidentRow.version == version)
        with db.translate_errors(self.url), Session(self.engine) as s:
            return [Incident.from_dict(json.loads(p)) for p in s.execute(q).scalars()]

    def get(self, incident_id: str) -> Incident:
        q = select(IncidentRow.payload).where(IncidentRow.id.startswith(incident_id, autoescape=True))
        with db.translate_errors(self.url), Session(self.engine) as s:
            rows = s.execute(q.limit(2)).scalars().all()
        if not rows:
            raise TrustmoeError(f"no incident {incident_id!r} in {db.display_url(self.url)}")
        if len(rows) > 1:
            raise TrustmoeError(f"incident id {incident_id!r} is ambiguous (several match); give more digits")
        return Incident.from_dict(json.loads(rows[0]))

    def ack(self, incident_id: str, by: str | None = None) -> Incident:
        inc = self.get(incident_id)
        if inc.status == "acked":
            raise TrustmoeError(f"incident {inc.id} was already acknowledged")
        inc.status, inc.acked_at, inc.acked_by = "acked", time.time(), by
        self.store(inc)
        return inc

    def counts(self) -> dict[str, Any]:
        """Open and acknowledged incidents per version and detector."""
        r = IncidentRow
        q = select(r.version, r.detector, r.status, func.count(), func.max(r.opened_at)).group_by(
            r.version, r.detector, r.status)
        with db.translate_errors(self.url), Session(self.engine) as s:
            rows = s.execute(q).all()
        return {"rows": [{"version": v, "detector": d, "status": st, "count": n, "last_opened_at": last}
                         for v, d, st, n, last in rows]}

    def close(self) -> None:
        if self._own:
            self.engine.dispose()


class RegistrySink:
    """Stores incidents in the registry database and carries out their actions.

    `rollback_canary`: `set_canary_percent(0)` (the server's canary split), for an incident of
    the canary. `rollback_production`: `Registry.rollback(model, alias)` when the incident's
    version still holds that alias (checked, and the write conditioned on the alias history
    entry read, so a concurrent promotion is never undone), recorded with
    why="incident <id>: ..."; then `after_rollback()` (the server reloads from the registry).
    An incident of a canary under `rollback_production` rolls the canary back instead:
    production did not misbehave. Nothing here raises for a refused action: it says why.
    """

    def __init__(self, store: IncidentStore, registry: Registry | None = None,
                 set_canary_percent: Callable[[float], Any] | None = None,
                 after_rollback: Callable[[], Any] | None = None) -> None:
        self.store_, self.registry = store, registry
        self.set_canary_percent, self.after_rollback = set_canary_percent, after_rollback

    def store(self, incident: Incident) -> None:
        self.store_.store(incident)

    def act(self, incident: Incident) -> ActionResult:
        if incident.action == "notify":
            return ActionResult(False, "notify only")
        if incident.role == "canary":
            if self.set_canary_percent is None:
                return ActionResult(False, "no canary control was given to the monitor")
            self.set_canary_percent(0.0)
            return ActionResult(True, f"canary {incident.version} set to 0% of traffic")
        if incident.action == "rollback_canary":
            return ActionResult(False, f"{incident.version} is not a canary (role {incident.role}); "
                                       "the policy only rolls canaries back")
        return self._rollback_alias(incident)

    def _rollback_alias(self, inc: Incident) -> ActionResult:
        if self.registry is None or not inc.model or not inc.alias:
            return ActionResult(False, f"{inc.version} was not served from a registry alias: "
                                       "nothing to roll back")
        holder = self.registry.alias_holder(inc.model, inc.alias)
        num = re.search(r"[:@](\d+)$", inc.version)  # "demo:3" (a served key) or "demo@3"
        served = int(num.group(1)) if num else None
        if holder is None or (served is not None and holder.version != served):
            now = "nothing" if holder is None else f"v{holder.version}"
            return ActionResult(False, f"alias {inc.model}@{inc.alias} now holds {now}, not "
                                       f"{inc.version}: left as it is")
        why = (f"incident {inc.id}: {inc.detector} {inc.statistic:.4g} crossed {inc.threshold:.4g} "
               f"on {inc.version}")
        try:
            res = self.registry.rollback(inc.model, inc.alias, why=why, expected_seq=holder.seq,
                                         by="trustmoe-monitor")
        except TrustmoeError as e:
            return ActionResult(False, str(e))
        ev = res.event
        if self.after_rollback is not None:
            self.after_rollback()
        return ActionResult(True, f"alias {inc.model}@{inc.alias} rolled back v{ev.previous_version} -> "
                                  f"v{ev.version} (alias history #{ev.seq})")
