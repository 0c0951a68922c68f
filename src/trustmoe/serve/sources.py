"""Where a served model comes from: a registry ref or a plain model directory.

`parse_source` reads what the user wrote (`registry:NAME@ALIAS`, `registry:NAME@VERSION`, a
model dir, or for canary and shadow a bare `NAME@ALIAS`); `resolve_source` turns it into a
`ServedVersion` with a verified directory and a digest: the registry's (through
`Registry.resolve`, which re-hashes every file it hands out), or for a plain dir the SHA-256 of
its `model.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmoe.io import TrustmoeError, sha256_file

if TYPE_CHECKING:
    from trustmoe.serve.fleet import ServedVersion

REGISTRY_PREFIX = "registry:"


@dataclass(frozen=True)
class Source:
    """Where one role's model comes from."""

    role: str
    ref: str  # as given
    registry_ref: str | None  # "NAME@ALIAS" / "NAME@3" / "NAME" for a registry source
    path: Path | None  # a plain model dir

    @property
    def follows(self) -> bool:
        """True when the ref names an alias (or the latest version): it can move."""
        if self.registry_ref is None:
            return False
        tail = self.registry_ref.partition("@")[2]
        return not tail.isdigit()


def parse_source(role: str, ref: str, *, bare_is_registry: bool) -> Source:
    """`registry:NAME@X` is a registry ref; an existing directory is a model dir; otherwise, for
    canary and shadow (`bare_is_registry`), `NAME@X` is a registry ref too."""
    text = str(ref).strip()
    if text.startswith(REGISTRY_PREFIX):
        return Source(role, text, _check_ref(text[len(REGISTRY_PREFIX):], text), None)
    p = Path(text).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise TrustmoeError(f"{p} is not a model directory (no config.json)")
        return Source(role, text, None, p)
    if bare_is_registry and "@" in text and "/" not in text:
        return Source(role, text, _check_ref(text, text), None)
    raise TrustmoeError(f"model directory not found: {p} (a registry model is written "
                        f"registry:NAME@ALIAS)")


def _check_ref(raw: str, given: str) -> str:
    from trustmoe.deploy.records import parse_ref

    r = parse_ref(raw)  # RegistryError (a TrustmoeError) for a malformed name or version
    return str(r) if r.name else given


def resolve_source(src: Source, open_registry: Callable[[], Any]) -> ServedVersion:
    """The version `src` names now, ready to load (RegistryError / TrustmoeError: one line)."""
    from trustmoe.serve.fleet import ServedVersion

    if src.path is not None:
        weights = src.path / "model.safetensors"
        digest = sha256_file(weights) if weights.exists() else _dir_digest(src.path)
        name = src.path.resolve().name
        return ServedVersion(name, name, None, digest, src.role, src.path, None,
                             _dataset_sha(src.path), src.ref)
    assert src.registry_ref is not None
    r = open_registry().resolve(src.registry_ref)
    ds = r.metadata.get("dataset_manifest_sha256") if isinstance(r.metadata, dict) else None
    return ServedVersion(f"{r.name}:{r.version}", r.name, r.version, r.digest, src.role, r.path,
                         r.eval_path, ds if isinstance(ds, str) else None, src.ref)


def _dir_digest(path: Path) -> str:
    """A dir without model.safetensors (a quantized artifact): the hash of its file hashes."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def _dataset_sha(path: Path) -> str | None:
    try:
        tm = json.loads((path / "trustmoe.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ds = tm.get("dataset_manifest_sha256") if isinstance(tm, dict) else None
    return ds if isinstance(ds, str) else None
