"""File manifests: every artifact dir lists each of its files with size and SHA-256.

An allow-list, not a blocklist: a dir loads only if it holds exactly the files its manifest
names, each with the recorded hash. `integrity.json`:

    {"format": "trustmoe-files/1", "algorithm": "sha256",
     "files": {"config.json": {"size": 812, "sha256": "..."}, ...}}

Refused, each with the file's name: a changed file, a missing one, an extra one, a symlink
(file or folder), and a manifest entry that is absolute, has `..`, or otherwise points outside
the dir. `integrity.sig` (Ed25519, `signing.py`) signs the manifest's exact bytes.

Loading (`check_on_load`) is fast on the second and later loads: a file whose (size, mtime,
inode) matches what was hashed before, recorded in a local cache
(`~/.cache/trustmoe/integrity/`, moved by `TRUSTMOE_CACHE`), is not hashed again;
`verify_dir(path, full=True)` (`trustmoe verify`) always hashes everything.
A dir without a manifest (older artifacts, foreign Hugging Face dirs) loads with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from trustmoe.io import TrustmoeError, atomic_write_bytes, sha256_file

MANIFEST = "integrity.json"
SIGNATURE = "integrity.sig"
FORMAT = "trustmoe-files/1"
RESERVED = (MANIFEST, SIGNATURE)


class IntegrityError(TrustmoeError):
    """An artifact dir does not match its manifest (the message names the file)."""


@dataclass(frozen=True)
class Problem:
    kind: str  # changed | missing | extra | symlink | outside | manifest | signature
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.name}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerifyResult:
    path: str
    has_manifest: bool
    files: int = 0
    hashed: int = 0  # files actually re-hashed (the rest matched the local cache)
    problems: list[Problem] = field(default_factory=list)
    signed: bool = False
    signature_ok: bool | None = None  # None: no public key given
    signer: str | None = None  # fingerprint of the key that signed

    @property
    def ok(self) -> bool:
        return self.has_manifest and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "has_manifest": self.has_manifest,
                "files": self.files, "hashed": self.hashed, "signed": self.signed,
                "signature_ok": self.signature_ok, "signer": self.signer,
                "problems": [{"kind": p.kind, "name": p.name, "detail": p.detail}
                             for p in self.problems]}


def _listing(root: Path) -> tuple[dict[str, os.stat_result], list[Problem]]:
    """Every regular file under root (posix relative path -> lstat), symlinks as problems."""
    files: dict[str, os.stat_result] = {}
    problems: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for d in list(dirnames):
            if (base / d).is_symlink():
                problems.append(Problem("symlink", (base / d).relative_to(root).as_posix()))
                dirnames.remove(d)
        for f in filenames:
            p = base / f
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                problems.append(Problem("symlink", rel))
            elif not stat.S_ISREG(st.st_mode):
                problems.append(Problem("extra", rel, "not a regular file"))
            elif rel not in RESERVED:
                files[rel] = st
    return files, problems


def write_manifest(path: str | os.PathLike[str]) -> Path:
    """Hash every file of the dir into `integrity.json` (atomically). Call it last, after
    every other file of the artifact is written; it drops a signature that no longer fits."""
    root = Path(path)
    files, problems = _listing(root)
    if problems:
        raise IntegrityError(f"cannot write a manifest for {root}: {problems[0]}")
    entries = {rel: {"size": st.st_size, "sha256": sha256_file(root / rel)}
               for rel, st in sorted(files.items())}
    data = {"format": FORMAT, "algorithm": "sha256", "files": entries}
    atomic_write_bytes(root / MANIFEST, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    sig = root / SIGNATURE
    if sig.exists():
        sig.unlink()
    return root / MANIFEST


def refresh_manifest(path: str | os.PathLike[str], names: list[str]) -> None:
    """After a stage edits files of an existing artifact in place: re-hash just those entries
    (no-op for a dir without a manifest). The old signature no longer fits and is removed."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        return
    entries = read_manifest(root)
    for name in names:
        p = root / name
        if p.is_symlink() or not p.is_file():
            entries.pop(name, None)
        else:
            entries[name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    data = {"format": FORMAT, "algorithm": "sha256", "files": dict(sorted(entries.items()))}
    atomic_write_bytes(root / MANIFEST, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    if (root / SIGNATURE).exists():
        (root / SIGNATURE).unlink()


def _safe_rel(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and p.as_posix() == name and name != "."


def read_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table, validated (raises IntegrityError naming what is wrong)."""
    return parse_manifest((root / MANIFEST).read_bytes(), root)


def parse_manifest(raw: bytes, root: Path | str) -> dict[str, dict[str, Any]]:
    """`read_manifest` of the bytes of an integrity.json (e.g. a stored copy); `root` names it."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise IntegrityError(f"{Path(root) / MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("files"), dict):
        raise IntegrityError(f"{Path(root) / MANIFEST} is not a {FORMAT} manifest")
    out: dict[str, dict[str, Any]] = {}
    for name, ent in data["files"].items():
        if not _safe_rel(name) or name in RESERVED:
            raise IntegrityError(f"{root}: manifest entry {name!r} points outside the directory")
        ok = (isinstance(ent, dict) and isinstance(ent.get("size"), int)
              and isinstance(ent.get("sha256"), str) and len(ent["sha256"]) == 64)
        if not ok:
            raise IntegrityError(f"{root}: manifest entry {name!r} is malformed")
        out[name] = ent
    return out


# ---------------------------------------------------------------- local hash cache


def _cache_file(root: Path) -> Path:
    base = Path(os.environ.get("TRUSTMOE_CACHE") or Path.home() / ".cache" / "trustmoe")
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return base / "integrity" / f"{key}.json"


def _load_cache(root: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads(_cache_file(root).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(root: Path, cache: dict[str, list[Any]]) -> None:
    with contextlib.suppress(OSError):  # a read-only home is no reason to refuse a model
        atomic_write_bytes(_cache_file(root), json.dumps(cache).encode())


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def verify_dir(path: str | os.PathLike[str], pubkey: str | os.PathLike[str] | bytes | None = None,
               *, full: bool = True) -> VerifyResult:
    """Check a dir against its manifest (and its signature when `pubkey` is given).

    full=False trusts files whose (size, mtime, inode, ctime) match the local cache of earlier
    full hashes; full=True hashes every file."""
    root = Path(path)
    if not root.is_dir():
        raise TrustmoeError(f"not a directory: {root}")
    res = VerifyResult(path=str(root), has_manifest=(root / MANIFEST).is_file())
    files, res.problems = _listing(root)
    res.files = len(files)
    if not res.has_manifest:
        return res
    try:
        entries = read_manifest(root)
    except IntegrityError as e:
        res.problems.append(Problem("manifest", MANIFEST, str(e)))
        return res
    cache = {} if full else _load_cache(root)
    new_cache: dict[str, list[Any]] = {}
    for name, ent in sorted(entries.items()):
        st = files.get(name)
        if st is None:
            res.problems.append(Problem("missing", name))
            continue
        if st.st_size != ent["size"]:
            res.problems.append(Problem("changed", name, f"{st.st_size} bytes, manifest says {ent['size']}"))
            continue
        stamp = _stamp(st)
        hit = cache.get(name)
        if hit is not None and hit[:4] == stamp and hit[4] == ent["sha256"]:
            new_cache[name] = hit
            continue
        digest = sha256_file(root / name)
        res.hashed += 1
        if digest != ent["sha256"]:
            res.problems.append(Problem("changed", name, "SHA-256 differs from the manifest"))
        else:
            new_cache[name] = [*stamp, digest]
    for name in sorted(set(files) - set(entries)):
        res.problems.append(Problem("extra", name, "not in the manifest"))
    if not res.problems:
        _save_cache(root, new_cache)
    if (root / SIGNATURE).is_file() or pubkey is not None:
        from trustmoe.security.signing import check_signature

        check_signature(root, pubkey, res)
    return res


_warned: set[str] = set()


def check_on_load(path: str | os.PathLike[str], what: str = "artifact",
                  pubkey: str | os.PathLike[str] | bytes | None = None) -> VerifyResult:
    """Refuse a dir that does not match its manifest; warn once for a dir without one.

    `TRUSTMOE_VERIFY=full` hashes every file on every load; `TRUSTMOE_PUBKEY` (a key file)
    makes a valid signature by that key a condition of loading."""
    full = os.environ.get("TRUSTMOE_VERIFY", "").lower() == "full"
    pubkey = pubkey or os.environ.get("TRUSTMOE_PUBKEY") or None
    res = verify_dir(path, pubkey, full=full)
    if not res.has_manifest:
        if pubkey is not None:
            raise IntegrityError(f"{what} {path} has no {MANIFEST}, so no signature to check")
        key = str(Path(path).resolve())
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{what} {path} has no {MANIFEST}: its files are not verified "
                          "(an older or foreign directory)", stacklevel=2)
        return res
    if res.problems:
        more = f" (+{len(res.problems) - 1} more)" if len(res.problems) > 1 else ""
        raise IntegrityError(f"{what} {path} failed its integrity check: {res.problems[0]}{more}")
    if pubkey is not None and not res.signature_ok:
        raise IntegrityError(f"{what} {path}: no valid signature by the required key")
    return res
