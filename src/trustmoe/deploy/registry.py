"""The model registry: versions with their evidence, aliases with append-only history, gates.

Python interface (what `trustmoe registry`, the server and monitoring call)::

    reg = Registry.open(url=None, blobs=None)   # $TRUSTMOE_REGISTRY or ~/.trustmoe/registry.db
    v = reg.add(model_dir, "demo", eval_dir=..., security_dir=..., why="...")   # VersionInfo
    r = reg.resolve("registry:demo@production")  # ResolvedVersion: .name .version .digest
                                                 #   .path (verified read-only model dir)
                                                 #   .metadata .eval_path .security_path
    reg.get("demo@production", at=None)                  # VersionInfo (database only, no hashing)
    reg.alias_holder("demo", "production", at=None)      # AliasEvent | None (at: aware datetime)
    reg.promote("demo", 3, "production", why="...", force=False,
                policy=None, expected_seq=None)          # PromoteResult; policy: Policy | path
                                                         #   | None (gates.toml in force)
    reg.rollback("demo", "production", why="...")        # PromoteResult (previous holder)
    reg.history("demo", alias=None)                      # [AliasEvent], oldest first

`resolve` re-hashes every file it hands out (about a second per GB); to follow an alias, poll
the cheap `get(ref)` / `alias_holder(...)` (database only) and resolve when the digest changes.
Tables: `Base` / `metadata` (re-exported from `deploy.schema`); a later part adds its own
table with an Alembic migration in `deploy/migrations/versions/` (see the README there).

Errors are `RegistryError` (a `TrustmoeError`: one line, exit 2 in the CLI); `NotFoundError`,
`ConflictError` (another writer moved the alias first: nothing was written), `GateRefusal`
(with `.report`), `BlobError` (a missing or changed file, named) are its kinds.

Storage: SQLAlchemy (`deploy.schema`, Alembic migrations run on open) + a content-addressed
blob store (`deploy.blobs`). `add` writes blobs first and the version in one transaction, so
a crash leaves no half-version; `gc` removes the orphaned blobs. Promotions use optimistic
concurrency on the alias's sequence number (unique in the database).
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from trustmoe.deploy import db
from trustmoe.deploy.blobs import (
    BlobStore,
    FileEntry,
    GcReport,
    Staged,
    collect_dir,
    manifest_digest,
)
from trustmoe.deploy.db import ConflictError, RegistryError
from trustmoe.deploy.evidence import build_metadata, read_json_part, store_reader
from trustmoe.deploy.records import (
    AliasEvent,
    ModelSummary,
    NotFoundError,
    PromoteResult,
    ResolvedVersion,
    VerifyReport,
    VersionInfo,
    check_name,
    parse_ref,
)
from trustmoe.deploy.schema import AliasEventRow, Base, FileRow, ModelRow, VersionRow, metadata
from trustmoe.deploy.signatures import SignaturePolicy, check_signed
from trustmoe.security.integrity import RESERVED

__all__ = ["Base", "Registry", "ResolvedVersion", "metadata"]

PARTS = ("model", "eval", "security")
ENV_BLOBS = "TRUSTMOE_BLOBS"
FAULT_ENV = "TRUSTMOE_REGISTRY_FAULT"  # crash tests: "point" -> print "FAULT point", sleep
TRAIN_STATE = "train_state.safetensors"  # = train.checkpoint.STATE_FILE: optimizer state


def whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now() -> datetime:
    return datetime.now(timezone.utc)


def fault_point(name: str) -> None:
    """A named point where the crash tests kill the process (no-op unless asked for)."""
    if name in os.environ.get(FAULT_ENV, "").split(","):
        print(f"FAULT {name}", file=sys.stderr, flush=True)
        time.sleep(120)


def default_blob_root(url: str, registry_id: str) -> Path:
    env = os.environ.get(ENV_BLOBS)
    if env:
        return Path(env).expanduser().absolute()
    path = db.sqlite_path(url)
    if path is not None:
        return path.with_name(path.name + ".blobs") if not path.suffix else path.with_suffix(".blobs")
    return Path("~/.trustmoe/blobs").expanduser() / registry_id


class Registry:
    def __init__(self, url: str, engine: Engine, store: BlobStore, registry_id: str) -> None:
        self.url, self.engine, self.store, self.registry_id = url, engine, store, registry_id

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, url: str | os.PathLike[str] | None = None, *, blobs: str | os.PathLike[str] | None = None,
             create: bool = True) -> Registry:
        """Open (and with `create`, make) a registry; migrates its schema to the newest."""
        full = db.resolve_url(url)
        path = db.sqlite_path(full)
        if path is not None:
            if path.is_dir():
                raise RegistryError(f"registry database {path} is a directory, not a file")
            if not path.exists():
                if not create:
                    raise NotFoundError(f"no registry at {path} (`trustmoe registry add` creates one)")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise RegistryError(f"cannot create {path.parent}: {e.strerror}") from None
        engine = db.make_engine(full)
        with db.translate_errors(full):
            db.migrate(engine)
            if path is not None:
                db.enable_wal(engine)
            registry_id = db.registry_id(engine)
        store = BlobStore(Path(blobs).expanduser().absolute() if blobs is not None
                          else default_blob_root(full, registry_id))
        store.claim(registry_id)
        return cls(full, engine, store, registry_id)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _write(self) -> Session:
        return Session(db.writer(self.engine), expire_on_commit=False)

    # ------------------------------------------------------------------ adding

    def add(self, model_dir: Path, name: str, *, eval_dir: Path | None = None,
            security_dir: Path | None = None, data_dir: Path | None = None, why: str = "",
            by: str | None = None, progress: Callable[[str, int], None] | None = None,
            notice: Callable[[str], None] | None = None, train_state: bool = False,
            signatures: SignaturePolicy | None = None) -> VersionInfo:
        """Register the files of `model_dir` (+ eval/security dirs) as the next version of `name`.
        Returns the new version, or the existing one when every file is identical to it.
        A checkpoint's optimizer state (train_state.safetensors, twice the weights) is left out
        unless `train_state`: serving never reads it. `signatures` (default: the gates file's
        `[signatures]`) may require the model to be signed by a trusted key."""
        check_name(name)
        sig_policy = signatures if signatures is not None else self.signature_policy()
        sources = {"model": Path(model_dir)}
        if eval_dir is not None:
            sources["eval"] = Path(eval_dir)
        if security_dir is not None:
            sources["security"] = Path(security_dir)
        found = {part: collect_dir(src, part, () if train_state or part != "model" else (TRAIN_STATE,))
                 for part, src in sources.items()}  # refuse bad input before storing anything
        parts: dict[str, list[FileEntry]] = {}
        staged: dict[str, Staged] = {}
        try:
            for part, files in found.items():
                parts[part] = []
                for rel, path in files:
                    if progress:
                        progress(f"{part}/{rel}", path.stat().st_size)
                    try:
                        st = self.store.stage(path)
                    except OSError as e:
                        raise RegistryError(f"cannot store {path}: {e.strerror}") from None
                    staged.setdefault(st.sha256, st)
                    if staged[st.sha256] is not st:
                        BlobStore.discard([st])  # the same content twice in one add
                    parts[part].append(FileEntry(rel, st.sha256, st.size))
            digests = {part: manifest_digest(es) for part, es in parts.items()}
            meta = build_metadata(lambda e: staged[e.sha256].tmp.read_bytes(), parts, digests,
                                  sources, data_dir, notice or (lambda _m: None))
            signed = check_signed(parts["model"], lambda e: staged[e.sha256].tmp.read_bytes(), sig_policy,
                                  f"model dir {model_dir}", () if train_state else (TRAIN_STATE,))
            if signed is not None:
                meta["signature"] = signed
            for st in staged.values():  # every check passed: only now does the store change
                self.store.commit(st)
        finally:
            BlobStore.discard(staged.values())  # no-op for committed files
        fault_point("add:blobs-written")
        with db.translate_errors(self.url):
            same = self._identical(name, digests)
            if same is not None:
                if notice:
                    notice(f"identical to {name} v{same.version} (same files); not registered again")
                return same
            for attempt in range(8):
                try:
                    return self._insert_version(name, parts, digests, meta, why, by or whoami())
                except sa_exc.IntegrityError:
                    if attempt == 7:
                        raise ConflictError(f"could not allocate a version number for {name}: "
                                            "other writers kept taking it; try again") from None
                    time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _identical(self, name: str, digests: dict[str, str]) -> VersionInfo | None:
        with self._read() as s:
            rows = s.execute(select(VersionRow).join(ModelRow).where(
                ModelRow.name == name, VersionRow.digest == digests["model"])).scalars().all()
            for row in rows:
                if row.meta.get("digests") == digests:
                    return self._info(s, name, row)
        return None

    def _insert_version(self, name: str, parts: dict[str, list[FileEntry]], digests: dict[str, str],
                        meta: dict[str, Any], why: str, by: str) -> VersionInfo:
        with self._write() as s, s.begin():
            model = s.execute(select(ModelRow).where(ModelRow.name == name)).scalar_one_or_none()
            if model is None:
                model = ModelRow(name=name, created_at=now(), created_by=by)
                s.add(model)
                s.flush()
            last = s.execute(select(func.max(VersionRow.version)).where(
                VersionRow.model_id == model.id)).scalar()
            row = VersionRow(model_id=model.id, version=(last or 0) + 1, digest=digests["model"],
                             dataset_sha256=meta.get("dataset_manifest_sha256"),
                             created_at=now(), created_by=by, why=why, meta=meta)
            s.add(row)
            s.flush()
            s.add_all([FileRow(version_id=row.id, part=part, path=e.path, sha256=e.sha256,
                               size=e.size) for part, es in parts.items() for e in es])
            s.flush()
            fault_point("add:before-commit")
            return VersionInfo(name, row.version, row.digest, row.created_at, by, why, meta, ())

    # ------------------------------------------------------------------ reading

    def _model(self, s: Session, name: str) -> ModelRow:
        check_name(name)
        m = s.execute(select(ModelRow).where(ModelRow.name == name)).scalar_one_or_none()
        if m is None:
            known = s.execute(select(ModelRow.name).order_by(ModelRow.name).limit(5)).scalars().all()
            hint = f" (known: {', '.join(known)})" if known else " (the registry is empty)"
            raise NotFoundError(f"unknown model {name!r}{hint}")
        return m

    def _version_row(self, s: Session, model: ModelRow, version: int) -> VersionRow:
        row = s.execute(select(VersionRow).where(VersionRow.model_id == model.id,
                                                 VersionRow.version == version)).scalar_one_or_none()
        if row is None:
            last = s.execute(select(func.max(VersionRow.version)).where(
                VersionRow.model_id == model.id)).scalar()
            raise NotFoundError(f"unknown version {model.name}@{version} (versions 1..{last or 0})")
        return row

    def _info(self, s: Session, name: str, row: VersionRow) -> VersionInfo:
        aliases = tuple(sorted(a for a, v in self._current_aliases(s, row.model_id).items()
                               if v == row.version))
        if not isinstance(row.meta, dict):
            raise RegistryError(f"registry record of {name}@{row.version} has corrupt metadata")
        return VersionInfo(name, row.version, row.digest, row.created_at, row.created_by, row.why,
                           row.meta, aliases)

    def _current_aliases(self, s: Session, model_id: int, at: datetime | None = None
                         ) -> dict[str, int]:
        q = select(AliasEventRow.alias, AliasEventRow.version, AliasEventRow.seq).where(
            AliasEventRow.model_id == model_id)
        if at is not None:
            q = q.where(AliasEventRow.at <= at)
        latest: dict[str, tuple[int, int]] = {}
        for alias, version, seq in s.execute(q):
            if alias not in latest or seq > latest[alias][0]:
                latest[alias] = (seq, version)
        return {a: v for a, (_seq, v) in sorted(latest.items())}

    def models(self) -> list[ModelSummary]:
        with db.translate_errors(self.url), self._read() as s:
            out = []
            for m in s.execute(select(ModelRow).order_by(ModelRow.name)).scalars():
                n, last = s.execute(select(func.count(), func.max(VersionRow.version)).where(
                    VersionRow.model_id == m.id)).one()
                out.append(ModelSummary(m.name, n, last or 0, m.created_at,
                                        self._current_aliases(s, m.id)))
            return out

    def versions(self, name: str) -> list[VersionInfo]:
        with db.translate_errors(self.url), self._read() as s:
            m = self._model(s, name)
            rows = s.execute(select(VersionRow).where(VersionRow.model_id == m.id)
                             .order_by(VersionRow.version)).scalars().all()
            return [self._info(s, name, r) for r in rows]

    def find_alias(self, alias: str, at: datetime | None = None) -> list[tuple[str, int]]:
        """Every (model, version) that `alias` points at (now, or at time `at`)."""
        with db.translate_errors(self.url), self._read() as s:
            out = []
            for m in s.execute(select(ModelRow).order_by(ModelRow.name)).scalars():
                v = self._current_aliases(s, m.id, at).get(alias)
                if v is not None:
                    out.append((m.name, v))
            return out

    def get(self, ref: str, at: datetime | None = None) -> VersionInfo:
        """The version a ref names (an alias as of `at`, default now; a bare name: the latest)."""
        r = parse_ref(ref)
        with db.translate_errors(self.url), self._read() as s:
            m = self._model(s, r.name)
            if r.alias is not None:
                ev = self._holder(s, m, r.alias, at)
                if ev is None:
                    when = f" at {at.isoformat()}" if at else ""
                    raise NotFoundError(f"alias {r.name}@{r.alias} points at no version{when}")
                version = ev.version
            elif r.version is not None:
                version = r.version
            else:
                version = s.execute(select(func.max(VersionRow.version)).where(
                    VersionRow.model_id == m.id)).scalar() or 0
            return self._info(s, r.name, self._version_row(s, m, version))

    def files(self, name: str, version: int, part: str = "model") -> list[FileEntry]:
        with db.translate_errors(self.url), self._read() as s:
            row = self._version_row(s, self._model(s, name), version)
            return [FileEntry(f.path, f.sha256, f.size) for f in s.execute(
                select(FileRow).where(FileRow.version_id == row.id, FileRow.part == part)
                .order_by(FileRow.path)).scalars()]

    def read_json(self, name: str, version: int, part: str, filename: str) -> Any:
        """A JSON file of a version's part (e.g. "eval", "eval.json"), or None; verified first."""
        entries = self.files(name, version, part)
        wanted = [e for e in entries if e.path == filename]
        self.store.verify_entries(wanted, f"{name}@{version} {part}")
        return read_json_part(store_reader(self.store), wanted, filename, f"{name}@{version} {part}")

    def resolve(self, ref: str, at: datetime | None = None) -> ResolvedVersion:
        """The verified, materialized files of the version `ref` names (see module docstring)."""
        info = self.get(ref, at)
        paths: dict[str, Path | None] = {}
        for part in PARTS:
            entries = self.files(info.name, info.version, part)
            if not entries:
                paths[part] = None
                continue
            digest = info.digest if part == "model" else manifest_digest(entries)
            paths[part] = self.store.materialize(digest, entries, f"{info.name}@{info.version} {part}")
        model_path = paths["model"]
        assert model_path is not None
        return ResolvedVersion(info.name, info.version, info.digest, model_path, info.metadata,
                               parse_ref(ref).alias, paths["eval"], paths["security"])

    # ------------------------------------------------------------------ aliases

    def _holder(self, s: Session, m: ModelRow, alias: str, at: datetime | None
                ) -> AliasEventRow | None:
        q = select(AliasEventRow).where(AliasEventRow.model_id == m.id, AliasEventRow.alias == alias)
        if at is not None:
            q = q.where(AliasEventRow.at <= at)
        return s.execute(q.order_by(AliasEventRow.seq.desc()).limit(1)).scalar_one_or_none()

    def alias_holder(self, name: str, alias: str, at: datetime | None = None) -> AliasEvent | None:
        """The history entry that set `alias` as of `at` (default now); None if it held nothing."""
        with db.translate_errors(self.url), self._read() as s:
            m = self._model(s, name)
            row = self._holder(s, m, alias, at)
            return _event(name, row) if row is not None else None

    def history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        with db.translate_errors(self.url), self._read() as s:
            m = self._model(s, name)
            q = select(AliasEventRow).where(AliasEventRow.model_id == m.id)
            if alias is not None:
                q = q.where(AliasEventRow.alias == alias)
            rows = s.execute(q.order_by(AliasEventRow.at, AliasEventRow.id)).scalars().all()
            return [_event(name, r) for r in rows]

    def promote(self, name: str, version: int, alias: str, *, why: str = "", force: bool = False,
                policy: Any = None, expected_seq: int | None = None, by: str | None = None
                ) -> PromoteResult:
        """Point `alias` at `version` if the gates pass (or `force` with a `why`); a required
        signature (the policy's `[signatures]`) is checked first and cannot be forced."""
        from trustmoe.deploy.aliases import _policy, promote

        pol = _policy(self, policy)
        if pol.signatures.require:
            self.check_signature(name, version, pol.signatures)
        return promote(self, name, version, alias, why=why, force=force, policy=pol,
                       expected_seq=expected_seq, by=by or whoami())

    def signature_policy(self) -> SignaturePolicy:
        """The `[signatures]` of the gates file in force (none, or a named file that does not
        exist: signatures are not required to add; `promote` refuses a missing gates file)."""
        from trustmoe.deploy.aliases import find_policy_file
        from trustmoe.deploy.gates import load_policy

        path = find_policy_file(self.url)
        return load_policy(path).signatures if path is not None and path.is_file() else SignaturePolicy()

    def check_signature(self, name: str, version: int, policy: SignaturePolicy) -> dict[str, Any] | None:
        """Check a stored version's signature against `policy` (RegistryError if it fails)."""
        entries = self.files(name, version, "model")
        signing = [e for e in entries if e.path in RESERVED]
        self.store.verify_entries(signing, f"{name}@{version} model")
        return check_signed(entries, store_reader(self.store), policy, f"{name} v{version}")

    def rollback(self, name: str, alias: str, why: str = "", *, expected_seq: int | None = None,
                 by: str | None = None) -> PromoteResult:
        """Point `alias` back at the holder before its last promotion (gates are not re-run)."""
        from trustmoe.deploy.aliases import rollback

        return rollback(self, name, alias, why=why, expected_seq=expected_seq, by=by or whoami())

    # ------------------------------------------------------------------ housekeeping

    def verify(self, progress: Callable[[str, int], None] | None = None) -> VerifyReport:
        """Re-hash every blob once; check digests and alias histories (nothing is changed)."""
        from trustmoe.deploy.upkeep import verify

        return verify(self, progress)

    def gc(self, grace_s: float = 3600.0) -> GcReport:
        """Remove blobs and trees no version references (older than `grace_s` seconds)."""
        from trustmoe.deploy.upkeep import gc

        return gc(self, grace_s)


def _event(name: str, r: AliasEventRow) -> AliasEvent:
    if not isinstance(r.gates, dict):
        raise RegistryError(f"alias history of {name}@{r.alias} seq {r.seq} is corrupt")
    return AliasEvent(name, r.alias, r.seq, r.version, r.previous_version, r.action, r.forced,
                      r.at, r.by, r.why, r.gates)
