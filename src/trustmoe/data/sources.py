"""Sources: where raw documents come from, and how each input file is listed and read.

A source is a folder of text/code files, a single text file, a JSONL file (one document per
line, text under `text_field`), a Parquet file (needs `pyarrow`), or the built-in corpus
`stdlib`: the running interpreter's standard-library `.py` source (licence PSF-2.0).

Every input file is listed with its path relative to its source, size and SHA-256 before any
rule runs, so the manifest accounts for every file, including the ones that are dropped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trustmoe.io import TrustmoeError, require_extra

STDLIB = "stdlib"
STDLIB_LICENSE = "PSF-2.0"
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
DEFAULT_EXCLUDES = (".*", "__pycache__", "*.pyc", "*.pyo")


@dataclass(frozen=True)
class SourceSpec:
    """One source as given on the command line, resolved."""

    name: str  # unique short name; documents are named "<name>/<relative path>"
    kind: str  # stdlib | dir | text | jsonl | parquet
    root: Path
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    text_field: str = "text"


@dataclass
class InputFile:
    """One file on disk that belongs to a source."""

    source: str
    path: str  # relative to the source root, '/'-separated
    abspath: Path
    bytes: int
    sha256: str


@dataclass
class RawDoc:
    """One document read from an input file (a whole file, or one JSONL/Parquet record)."""

    id: str  # "<source>/<path>" or "<source>/<path>#<record>"
    source: str
    path: str
    data: bytes | str  # bytes from text files (decoded by the quality rule), str from records
    notes: dict[str, str] = field(default_factory=dict)


def resolve_sources(
    sources: list[str],
    include_tests: bool = False,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    text_field: str = "text",
) -> list[SourceSpec]:
    """Turn command-line source strings into specs; raises TrustmoeError on a missing path."""
    specs: list[SourceSpec] = []
    used: set[str] = set()
    for s in sources or [STDLIB]:
        if s == STDLIB:
            root = Path(sysconfig.get_paths()["stdlib"])
            excl: tuple[str, ...] = ("site-packages", "dist-packages", *DEFAULT_EXCLUDES)
            if not include_tests:
                excl = (*excl, *sorted(STDLIB_TEST_DIRS))
            spec = SourceSpec(_unique(STDLIB, used), "stdlib", root, include or ("*.py",),
                              excl + exclude)
        else:
            p = Path(s).expanduser()
            if not p.exists():
                raise TrustmoeError(f"source not found: {s}")
            p = p.resolve()
            kind = "dir" if p.is_dir() else _file_kind(p)
            spec = SourceSpec(
                _unique(p.stem if kind != "dir" else p.name or "root", used), kind, p,
                include or ("*",), (*DEFAULT_EXCLUDES, *exclude), text_field,
            )
        specs.append(spec)
    return specs


def _unique(name: str, used: set[str]) -> str:
    base, i = name.replace("/", "_") or "source", 1
    out = base
    while out in used:
        i += 1
        out = f"{base}-{i}"
    used.add(out)
    return out


def _file_kind(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def list_files(spec: SourceSpec) -> list[InputFile]:
    """Every file of a source, sorted by relative path, with size and SHA-256."""
    if spec.kind != "dir" and spec.kind != "stdlib":
        return [_input_file(spec, spec.root, spec.root.name)]
    out = []
    for path, rel in _walk(spec):
        try:
            out.append(_input_file(spec, path, rel))
        except OSError as e:
            out.append(InputFile(spec.name, rel, path, -1, f"unreadable: {e.strerror}"))
    return out


def _walk(spec: SourceSpec) -> Iterator[tuple[Path, str]]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(spec.root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _matches(d, spec.exclude))
        base = Path(dirpath)
        for fn in filenames:
            path = base / fn
            rel = path.relative_to(spec.root).as_posix()
            if _matches(fn, spec.exclude) or _matches(rel, spec.exclude):
                continue
            if not (_matches(fn, spec.include) or _matches(rel, spec.include)):
                continue
            if path.is_symlink() or not path.is_file():
                continue
            found.append((rel, path))
    for rel, path in sorted(found):
        yield path, rel


def _matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _input_file(spec: SourceSpec, path: Path, rel: str) -> InputFile:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return InputFile(spec.name, rel, path, size, h.hexdigest())


def read_documents(spec: SourceSpec, f: InputFile) -> Iterator[RawDoc]:
    """Documents of one input file; unreadable records are yielded with a note (never raised)."""
    doc_id = f"{f.source}/{f.path}"
    if f.bytes < 0:
        yield RawDoc(doc_id, f.source, f.path, b"", {"error": f.sha256})
        return
    try:
        data = f.abspath.read_bytes()
    except OSError as e:
        yield RawDoc(doc_id, f.source, f.path, b"", {"error": f"unreadable: {e.strerror}"})
        return
    if spec.kind == "jsonl":
        yield from _jsonl_docs(doc_id, f, data, spec.text_field)
    elif spec.kind == "parquet":
        yield from _parquet_docs(doc_id, f, spec.text_field)
    else:
        yield RawDoc(doc_id, f.source, f.path, data)


def _jsonl_docs(doc_id: str, f: InputFile, data: bytes, field_name: str) -> Iterator[RawDoc]:
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        rid = f"{doc_id}#{n}"
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield RawDoc(rid, f.source, f.path, b"", {"error": "invalid_utf8"})
            continue
        except json.JSONDecodeError as e:
            yield RawDoc(rid, f.source, f.path, b"", {"error": f"malformed JSON: {e.msg}"})
            continue
        text = rec.get(field_name) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            yield RawDoc(rid, f.source, f.path, b"", {"error": f"no string field {field_name!r}"})
            continue
        yield RawDoc(rid, f.source, f.path, text)


def _parquet_docs(doc_id: str, f: InputFile, field_name: str) -> Iterator[RawDoc]:
    pq = require_extra("pyarrow.parquet", "parquet", f"{f.abspath} is Parquet; reading it")
    try:
        table = pq.read_table(f.abspath, columns=[field_name])
    except Exception as e:  # pyarrow raises many types for bad files
        raise TrustmoeError(f"cannot read Parquet {f.abspath}: {e}") from None
    for n, text in enumerate(table.column(field_name).to_pylist(), start=1):
        if isinstance(text, str):
            yield RawDoc(f"{doc_id}#{n}", f.source, f.path, text)
        else:
            yield RawDoc(f"{doc_id}#{n}", f.source, f.path, b"", {"error": "not a string"})
