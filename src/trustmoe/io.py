"""Crash-safe file writes and hashing shared by every artifact writer.

Nothing half-written may look complete: files are written to a temporary sibling and
renamed; directories are built under a temporary name and swapped in.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any


class TrustmoeError(Exception):
    """An error with one clear, user-facing message (the CLI prints it without a traceback)."""


# The optional extras of pyproject.toml and the top-level module each one brings. Everything
# else the chain uses (data, eval, serve, deploy, security) is a base dependency.
EXTRAS: dict[str, str] = {
    "pyarrow": "parquet",  # Parquet sources for `data build`
    "gguf": "export",  # `trustmoe export gguf`
    "psycopg": "postgres",  # a PostgreSQL registry URL
    "ray": "ray",  # Ray Serve deployment
    "transformers": "bench",  # peer measurements in benchmarks/
}


class MissingExtraError(TrustmoeError):
    """An optional dependency is not installed; the message names the pip command to run."""

    def __init__(self, module: str, extra: str, purpose: str | None = None) -> None:
        self.module, self.extra = module, extra
        what = f"{purpose} needs" if purpose else "this needs"
        super().__init__(f"{what} the optional package {module!r}, which is not installed: "
                         f"pip install 'trustmoe[{extra}]'")


def require_extra(module: str, extra: str | None = None, purpose: str | None = None
                  ) -> ModuleType:
    """Import an optional dependency, or raise `MissingExtraError` naming the extra to install.

    `require_extra("pyarrow.parquet", "parquet", "reading Parquet")` returns the module; when
    pyarrow is absent the error reads "reading Parquet needs the optional package 'pyarrow',
    which is not installed: pip install 'trustmoe[parquet]'". `extra` defaults to the entry of
    `EXTRAS` for the module's top-level package.
    """
    top = module.split(".", 1)[0]
    extra = extra or EXTRAS.get(top)
    if extra is None:
        raise ValueError(f"no extra is known for {module!r}; pass extra=")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or top
        if missing.split(".", 1)[0] != top:
            raise  # the extra is installed but broken inside: not a missing-extra case
        raise MissingExtraError(top, extra, purpose) from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Read JSON or raise TrustmoeError naming the file and the problem."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrustmoeError(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise TrustmoeError(f"{what} is not valid UTF-8: {path}") from None
    except json.JSONDecodeError as e:
        raise TrustmoeError(f"{what} is malformed JSON: {path} (line {e.lineno}: {e.msg})") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (old contents kept until then).

    If the body raises, the temporary directory is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result normal permissions
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def json_safe(x: Any) -> Any:
    """`x` as strict JSON data: dict keys as strings, tuples as lists, numpy/torch scalars as
    Python numbers, NaN and ±inf as None (json.dumps would write the invalid `NaN`)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if not isinstance(x, str | bytes) and getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        x = x.item()  # numpy / torch 0-d
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
