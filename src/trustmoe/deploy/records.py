"""What the registry hands out: typed, immutable records (dataclasses), and reference parsing.

    ref grammar   [registry:]NAME[@VERSION|@ALIAS]     e.g. demo, demo@3, registry:demo@production
    NAME          letters, digits, . _ - (starting with a letter or digit; up to 200)
    ALIAS         a lowercase letter, then lowercase letters, digits, _ - (up to 64), so an alias
                  can never be mistaken for a version number
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trustmoe.deploy.db import RegistryError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
REF_PREFIX = "registry:"


class NotFoundError(RegistryError):
    """An unknown model name, version or alias."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
                            "(starting with a letter or digit)")
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise RegistryError(f"invalid alias {alias!r}: a lowercase letter, then lowercase "
                            "letters, digits, '_' or '-' (e.g. production, canary)")
    return alias


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        tail = f"@{self.version}" if self.version is not None else (
            f"@{self.alias}" if self.alias else "")
        return f"{self.name}{tail}"


def parse_ref(ref: str) -> Ref:
    """`NAME`, `NAME@VERSION`, `NAME@ALIAS`, with an optional `registry:` prefix."""
    raw = ref[len(REF_PREFIX):] if ref.startswith(REF_PREFIX) else ref
    name, sep, tail = raw.partition("@")
    check_name(name)
    if not sep:
        return Ref(name)
    if tail.isdigit():
        if int(tail) < 1:
            raise RegistryError(f"invalid version in {ref!r}: versions start at 1")
        return Ref(name, version=int(tail))
    return Ref(name, alias=check_alias(tail))


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; a trailing Z means UTC and a time without a zone is local time."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise RegistryError(f"not an ISO 8601 time: {text!r} (e.g. 2026-12-03T14:05:00Z)") from None
    return t.astimezone() if t.tzinfo is None else t


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    digest: str  # SHA-256 over the model files' manifest
    created_at: datetime
    created_by: str  # user@host
    why: str
    metadata: dict[str, Any]
    aliases: tuple[str, ...] = ()  # aliases that point at this version now

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "digest": self.digest,
                "created_at": iso(self.created_at), "created_by": self.created_by,
                "why": self.why, "aliases": list(self.aliases), "metadata": self.metadata}


@dataclass(frozen=True)
class ResolvedVersion:
    """A version ready to load: `path` is a verified, read-only directory of its model files."""

    name: str
    version: int
    digest: str
    path: Path
    metadata: dict[str, Any]
    alias: str | None = None  # the alias the ref named, if any
    eval_path: Path | None = None  # its eval dir (eval.json, profile.*), if one was registered
    security_path: Path | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def header(self) -> str:
        """`name@version sha256:digest` (what a server puts in x-trustmoe-model)."""
        return f"{self.name}@{self.version} sha256:{self.digest}"


@dataclass(frozen=True)
class AliasEvent:
    """One entry of an alias's append-only history."""

    name: str
    alias: str
    seq: int  # 1, 2, 3, ... per (name, alias)
    version: int  # the holder from this event on
    previous_version: int | None
    action: str  # promote | rollback
    forced: bool  # gates were overridden (--force --why)
    at: datetime
    by: str
    why: str
    gates: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "seq": self.seq, "version": self.version,
                "previous_version": self.previous_version, "action": self.action,
                "forced": self.forced, "at": iso(self.at), "by": self.by, "why": self.why,
                "gates": self.gates}


@dataclass(frozen=True)
class ModelSummary:
    name: str
    versions: int
    latest: int
    created_at: datetime
    aliases: dict[str, int]  # alias -> version it holds now

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "versions": self.versions, "latest": self.latest,
                "created_at": iso(self.created_at), "aliases": self.aliases}


@dataclass(frozen=True)
class PromoteResult:
    event: AliasEvent
    changed: bool  # False when the alias already pointed at the version
    report: Any = None  # gates.GateReport, None for rollbacks and no-ops

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event.to_dict(), "changed": self.changed,
                "gates": self.report.to_dict() if self.report is not None else None}


@dataclass
class VerifyReport:
    versions: int = 0
    blobs_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "versions": self.versions, "blobs_checked": self.blobs_checked,
                "bytes_checked": self.bytes_checked, "problems": self.problems}
