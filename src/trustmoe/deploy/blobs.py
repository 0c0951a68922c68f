"""Content-addressed blob store: every file once, named by its SHA-256, verified on read.

    ROOT/REGISTRY               the id of the registry database this store belongs to
    ROOT/sha256/ab/abcdef...    one blob per distinct file content, read-only (0444)
    ROOT/trees/DIGEST/...       a version's files materialized as a read-only directory of hard
                                links to its blobs (copies across filesystems), shared by every
                                resolve of that digest
    ROOT/tmp/                   blobs being written (a crash leaves them here; gc removes them)

A part of a version (its model dir, eval dir or security dir) is a list of `FileEntry`
(relative path, SHA-256, size); its digest is the SHA-256 of the `sha256sum`-style manifest
`"<sha256>  <path>\\n"` over the entries sorted by path, so it depends on content and names
only. Files go in first (each written to tmp/, fsynced, renamed), the database record after,
so a crash never leaves a record without its blobs.

Only safetensors weights are accepted: a directory holding pickle files (`*.bin`, `*.pt`,
`*.pth`, `*.pkl`, ..., or any file that starts like a pickle or a torch zip) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from trustmoe.deploy.db import RegistryError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class BlobError(RegistryError):
    """A blob is missing, changed, or named by a record that points outside the store."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX path relative to the part's directory
    sha256: str
    size: int


def manifest_digest(entries: Iterable[FileEntry]) -> str:
    """SHA-256 over the sorted `sha256sum`-style manifest of `entries`."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.sha256}  {e.path}\n".encode())
    return h.hexdigest()


def safe_relpath(path: str, what: str) -> PurePosixPath:
    """`path` as a relative path that stays inside its directory, or BlobError naming `what`."""
    p = PurePosixPath(path)
    if (not path or p.is_absolute() or "\\" in path or "\x00" in path
            or any(part in ("", ".", "..") for part in p.parts) or path != p.as_posix()):
        raise BlobError(f"{what} names a path outside the registry: {path!r}; refusing it")
    return p


def check_sha(sha: str, what: str) -> str:
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise BlobError(f"{what} names an invalid blob id {sha!r}; refusing it")
    return sha


# ----------------------------------------------------------------------------- input dirs


def collect_dir(root: Path, part: str, skip: Iterable[str] = ()) -> list[tuple[str, Path]]:
    """Every regular file under `root` as (relative POSIX path, path), refusing pickles and
    links. Names starting with "." (temporary files of crashed writers) and the relative
    paths in `skip` are left out."""
    skipped = set(skip)
    if not root.is_dir():
        raise RegistryError(f"{part} directory not found: {root}")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise RegistryError(f"refusing to register {root}: {Path(dirpath) / d} is a "
                                    "symbolic link (copy its target in instead)")
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise RegistryError(f"refusing to register {root}: {p} is a symbolic link "
                                    "(copy its target in instead)")
            if not stat.S_ISREG(st.st_mode):
                raise RegistryError(f"refusing to register {root}: {p} is not a regular file")
            rel = p.relative_to(root).as_posix()
            if rel in skipped:
                continue
            _refuse_pickle(p, root)
            out.append((rel, p))
    if not out:
        raise RegistryError(f"{part} directory {root} holds no files")
    if part == "model":
        _check_model_files(root, out)
    return out


def _refuse_pickle(p: Path, root: Path) -> None:
    why = None
    if p.suffix.lower() in PICKLE_SUFFIXES:
        why = f"a pickle weights file ({p.suffix})"
    else:
        with open(p, "rb") as f:
            head = f.read(4)
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            why = "a pickle stream"
        elif head == b"PK\x03\x04":
            with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(p) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    why = "a torch zip with pickled tensors"
    if why:
        raise RegistryError(
            f"refusing to register {root}: {p.name} is {why}; the registry stores safetensors "
            "weights only (pickle can run code when loaded) - convert it with a trusted tool")


def _check_model_files(root: Path, files: list[tuple[str, Path]]) -> None:
    names = {rel for rel, _ in files}
    if "config.json" not in names:
        raise RegistryError(f"{root} is not a model directory: no config.json")
    weights = [p for rel, p in files if rel.endswith(".safetensors")]
    if not weights:
        raise RegistryError(f"{root} is not a model directory: no *.safetensors weights")
    for p in weights:
        _check_safetensors_header(p)


def _check_safetensors_header(p: Path) -> None:
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        ok = 2 <= n <= min(size - 8, 100 << 20)
        if ok:
            try:
                ok = isinstance(json.loads(f.read(n)), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
    if not ok:
        raise RegistryError(f"{p} is not a valid safetensors file (bad header); refusing it")


# ----------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class Staged:
    sha256: str
    size: int
    tmp: Path  # the copy in tmp/, until commit moves it to its blob path


@dataclass
class GcReport:
    blobs_removed: int = 0
    bytes_freed: int = 0
    trees_removed: int = 0
    tmp_removed: int = 0
    blobs_kept: int = 0


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()

    # -- layout
    def blob_path(self, sha: str, what: str = "a record") -> Path:
        check_sha(sha, what)
        return self.root / "sha256" / sha[:2] / sha

    def tree_path(self, digest: str) -> Path:
        return self.root / "trees" / check_sha(digest, "a version digest")

    def claim(self, registry_id: str) -> None:
        """Create the store, or check it belongs to the registry `registry_id`."""
        marker = self.root / "REGISTRY"
        try:
            if marker.exists():
                owner = marker.read_text(encoding="utf-8").strip()
                if owner != registry_id:
                    raise RegistryError(
                        f"blob store {self.root} belongs to another registry (id {owner}, this "
                        f"one is {registry_id}); point --blobs at this registry's own store")
                return
            ours = {"sha256", "trees", "tmp", "REGISTRY"}  # (another opener may be creating it)
            if self.root.exists() and any(p.name not in ours and not p.name.startswith(".REGISTRY.")
                                          for p in self.root.iterdir()):
                raise RegistryError(f"blob store {self.root} is a non-empty directory that is "
                                    "not a trustmoe blob store; refusing to use it")
            for sub in ("sha256", "trees", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            from trustmoe.io import atomic_write_text

            atomic_write_text(marker, registry_id + "\n")
        except OSError as e:
            raise RegistryError(f"cannot use blob store {self.root}: {e.strerror}") from None

    # -- writing: stage (copy + hash into tmp/), check, then commit (rename into place)
    def stage(self, src: Path) -> Staged:
        """Copy `src` into tmp/ while hashing it; nothing in the store changes yet."""
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while block := f.read(_CHUNK):
                    h.update(block)
                    out.write(block)
                    size += len(block)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return Staged(h.hexdigest(), size, Path(tmp))

    def commit(self, st: Staged) -> None:
        """Move a staged file to its blob path. An existing blob is kept and touched, so a
        concurrent gc's grace period protects it."""
        dest = self.blob_path(st.sha256)
        if dest.exists() and dest.stat().st_size == st.size:
            os.utime(dest)
            st.tmp.unlink(missing_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(st.tmp, 0o444)
        os.replace(st.tmp, dest)
        _fsync_dir(dest.parent)

    @staticmethod
    def discard(staged: Iterable[Staged]) -> None:
        for st in staged:
            st.tmp.unlink(missing_ok=True)

    def put(self, src: Path) -> tuple[str, int]:
        """Stage and commit one file; return (sha256, size)."""
        st = self.stage(src)
        try:
            self.commit(st)
        except BaseException:
            self.discard([st])
            raise
        return st.sha256, st.size

    # -- reading
    def problem(self, sha: str, size: int | None = None) -> str | None:
        """None if the blob is present with this content, else what is wrong with it."""
        p = self.blob_path(sha)
        try:
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode):
                return "is not a regular file in the blob store"
            if size is not None and st.st_size != size:
                return f"has changed (size {st.st_size}, recorded {size})"
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(_CHUNK):
                    h.update(block)
        except FileNotFoundError:
            return "is missing from the blob store"
        except OSError as e:
            return f"cannot be read ({e.strerror})"
        got = h.hexdigest()
        return None if got == sha else f"has changed (its SHA-256 is now {got[:12]}...)"

    def verify_entries(self, entries: Iterable[FileEntry], what: str) -> None:
        """Re-hash every blob of `entries`; BlobError naming the first bad file."""
        for e in entries:
            safe_relpath(e.path, what)
            issue = self.problem(check_sha(e.sha256, what), e.size)
            if issue:
                raise BlobError(f"{what}: file {e.path} (blob {e.sha256[:12]}...) {issue}; "
                                "refusing to use it")

    def materialize(self, digest: str, entries: list[FileEntry], what: str) -> Path:
        """A verified read-only directory holding `entries`, shared by every caller of `digest`."""
        self.verify_entries(entries, what)
        if manifest_digest(entries) != digest:
            raise BlobError(f"{what}: its file records do not add up to its digest "
                            f"{digest[:12]}...; the database record was altered")
        tree = self.tree_path(digest)
        if self._tree_ok(tree, entries):
            return tree
        tmp = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix=f"tree-{digest[:12]}-"))
        try:
            for e in entries:
                dest = tmp / safe_relpath(e.path, what)
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = self.blob_path(e.sha256)
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)
                    os.chmod(dest, 0o444)
            _chmod_dirs(tmp, 0o555)
            if tree.exists():  # stale or tampered: move it aside, readers keep their open files
                trash = self.root / "tmp" / f"old-{digest[:12]}-{uuid.uuid4().hex[:8]}"
                with contextlib.suppress(OSError):
                    os.replace(tree, trash)
            tree.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, tree)
            except OSError:  # another process built it at the same moment
                if not self._tree_ok(tree, entries):
                    raise
                _rmtree(tmp)
        except BaseException:
            _rmtree(tmp)
            raise
        return tree

    def _tree_ok(self, tree: Path, entries: list[FileEntry]) -> bool:
        if not tree.is_dir():
            return False
        want = {e.path: e for e in entries}
        found = 0
        for dirpath, _dirs, files in os.walk(tree):
            for name in files:
                p = Path(dirpath) / name
                e = want.get(p.relative_to(tree).as_posix())
                if e is None or p.is_symlink():
                    return False
                st, bst = p.stat(), self.blob_path(e.sha256).stat()
                same = (st.st_ino, st.st_dev) == (bst.st_ino, bst.st_dev)
                if not same and _sha256(p) != e.sha256:
                    return False
                found += 1
        return found == len(want)

    # -- housekeeping
    def all_blobs(self) -> list[str]:
        base = self.root / "sha256"
        if not base.is_dir():
            return []
        return sorted(p.name for d in base.iterdir() if d.is_dir() for p in d.iterdir())

    def gc(self, referenced: set[str], digests: set[str], grace_s: float,
           progress: Callable[[str], None] | None = None) -> GcReport:
        """Remove blobs no record names, trees of unknown digests and crashed writes, each only
        when older than `grace_s` (a writer between its blobs and its commit is protected)."""
        rep, now = GcReport(), time.time()

        def old(p: Path) -> bool:
            try:
                return now - p.lstat().st_mtime >= grace_s
            except FileNotFoundError:
                return False

        for sha in self.all_blobs():
            p = self.root / "sha256" / sha[:2] / sha
            if sha in referenced or not old(p):
                rep.blobs_kept += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                rep.bytes_freed += p.stat().st_size
                p.unlink()
                rep.blobs_removed += 1
                if progress:
                    progress(sha)
        trees = self.root / "trees"
        for t in sorted(trees.iterdir()) if trees.is_dir() else []:
            if t.name not in digests and old(t):
                _rmtree(t)
                rep.trees_removed += 1
        tmp = self.root / "tmp"
        for t in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            if old(t):
                _rmtree(t) if t.is_dir() else t.unlink(missing_ok=True)
                rep.tmp_removed += 1
        return rep


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _chmod_dirs(root: Path, mode: int) -> None:
    for dirpath, dirs, _files in os.walk(root, topdown=False):
        for d in dirs:
            os.chmod(Path(dirpath) / d, mode)
    os.chmod(root, mode)


def _rmtree(p: Path) -> None:
    """Remove a (read-only) tree."""
    if not p.exists():
        return
    with contextlib.suppress(OSError):
        _chmod_dirs(p, 0o755)
    shutil.rmtree(p, ignore_errors=True)
