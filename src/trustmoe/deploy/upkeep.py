"""Keeping the store honest: `verify` re-hashes every blob and checks the records; `gc`
removes what no record names (blobs of interrupted adds, stale trees and temp files)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select

from trustmoe.deploy import db
from trustmoe.deploy.blobs import BlobError, FileEntry, GcReport, manifest_digest, safe_relpath
from trustmoe.deploy.records import VerifyReport, iso
from trustmoe.deploy.schema import AliasEventRow, FileRow, ModelRow, VersionRow

if TYPE_CHECKING:
    from trustmoe.deploy.registry import Registry

FileRecord = tuple[str, int, str, FileEntry, str]  # name, version, part, entry, version digest


def all_files(reg: Registry) -> list[FileRecord]:
    """Every file record of every version."""
    with db.translate_errors(reg.url), reg._read() as s:
        q = (select(ModelRow.name, VersionRow.version, FileRow.part, FileRow.path,
                    FileRow.sha256, FileRow.size, VersionRow.digest)
             .join(VersionRow, VersionRow.id == FileRow.version_id)
             .join(ModelRow, ModelRow.id == VersionRow.model_id)
             .order_by(ModelRow.name, VersionRow.version, FileRow.part, FileRow.path))
        return [(n, v, part, FileEntry(p, sha, size), d)
                for n, v, part, p, sha, size, d in s.execute(q)]


def gc(reg: Registry, grace_s: float) -> GcReport:
    files = all_files(reg)
    digests = {d for *_, d in files}
    by_part: dict[tuple[str, int, str], list[FileEntry]] = {}
    for n, v, part, e, _d in files:
        by_part.setdefault((n, v, part), []).append(e)
    digests |= {manifest_digest(es) for (_n, _v, part), es in by_part.items() if part != "model"}
    return reg.store.gc({e.sha256 for _n, _v, _p, e, _d in files}, digests, grace_s)


def verify(reg: Registry, progress: Callable[[str, int], None] | None) -> VerifyReport:
    """Re-hash every blob once; check digests add up and the alias history is consistent."""
    files = all_files(reg)
    rep = VerifyReport()
    seen: dict[str, str | None] = {}
    groups: dict[tuple[str, int, str], list[FileEntry]] = {}
    digests: dict[tuple[str, int], str] = {}
    for name, version, part, e, digest in files:
        groups.setdefault((name, version, part), []).append(e)
        digests[(name, version)] = digest
        where = f"{name}@{version} {part}"
        try:
            reg.store.blob_path(e.sha256, where)
            safe_relpath(e.path, where)
        except BlobError as err:
            rep.problems.append(str(err))
            continue
        if e.sha256 not in seen:
            if progress:
                progress(f"{where}/{e.path}", e.size)
            seen[e.sha256] = reg.store.problem(e.sha256, e.size)
            rep.blobs_checked += 1
            rep.bytes_checked += e.size
        if seen[e.sha256]:
            rep.problems.append(f"{where}: file {e.path} (blob {e.sha256[:12]}...) {seen[e.sha256]}")
    for (name, version), digest in digests.items():
        if manifest_digest(groups.get((name, version, "model"), [])) != digest:
            rep.problems.append(f"{name}@{version}: its model file records do not add up to its "
                                f"digest {digest[:12]}... (the record was altered)")
    rep.versions = len(digests)
    _check_history(reg, rep)
    return rep


def _check_history(reg: Registry, rep: VerifyReport) -> None:
    with db.translate_errors(reg.url), reg._read() as s:
        if s.bind is not None and s.bind.dialect.name == "sqlite":
            res = s.connection().exec_driver_sql("PRAGMA quick_check").scalar()
            if res != "ok":
                rep.problems.append(f"SQLite quick_check: {res}")
        versions = {(m, v) for m, v in s.execute(select(VersionRow.model_id, VersionRow.version))}
        rows = s.execute(select(AliasEventRow, ModelRow.name).join(
            ModelRow, ModelRow.id == AliasEventRow.model_id)
            .order_by(AliasEventRow.model_id, AliasEventRow.alias, AliasEventRow.seq)).all()
        expect: dict[tuple[int, str], int] = {}
        for r, name in rows:
            key = (r.model_id, r.alias)
            want = expect.get(key, 0) + 1
            if r.seq != want:
                rep.problems.append(f"alias {name}@{r.alias}: history entry {r.seq} at {iso(r.at)} "
                                    f"follows entry {want - 1} (a gap or duplicate)")
            expect[key] = r.seq
            if (r.model_id, r.version) not in versions:
                rep.problems.append(f"alias {name}@{r.alias}: entry {r.seq} points at v{r.version}, "
                                    "which does not exist")
