"""Validate a safetensors file's header before any tensor is read.

The format: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer.
Checked here, each failure one `HeaderError` naming the file and the tensor:

- N is at least 2, at most `MAX_HEADER` and fits in the file; the header is UTF-8 JSON, an
  object without duplicate keys, nesting bounded;
- `__metadata__`, when present, maps strings to strings;
- every tensor has a known `dtype`, a `shape` of non-negative integers, `data_offsets`
  [begin, end] with end - begin == prod(shape) * itemsize;
- the tensors tile the data buffer exactly: no overlap, no gap, nothing past its end;
- optionally, each tensor's shape and dtype equal what the config expects.

Pickle is never involved: a pickle (or a zip holding one) under any name fails the first check.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from trustmoe.io import TrustmoeError

MAX_HEADER = 100 << 20  # the reference implementation's limit
MAX_DIMS = 8
DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
              "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class HeaderError(TrustmoeError):
    pass


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """(tensor table, data buffer size) of a safetensors file, fully validated."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError(f"{p}: not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise HeaderError(f"{p}: not a safetensors file (header length {n} does not fit "
                                  f"a file of {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise TrustmoeError(f"weights file not found: {p}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dupes)
    except HeaderError as e:
        raise HeaderError(f"{p}: header has a {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise HeaderError(f"{p}: header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{p}: header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise HeaderError(f"{p}: __metadata__ must map strings to strings")
    return header, size - 8 - n


def _check_entry(p: Path, name: str, e: Any, buf: int) -> tuple[int, int]:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError(f"{p}: tensor {name!r} needs exactly dtype, shape, data_offsets")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in DTYPE_SIZE:
        raise HeaderError(f"{p}: tensor {name!r} has unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40
                       for d in shape)):
        raise HeaderError(f"{p}: tensor {name!r} has a bad shape {shape!r}")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise HeaderError(f"{p}: tensor {name!r} has bad data_offsets {offs!r}")
    begin, end = offs
    if not 0 <= begin <= end <= buf:
        raise HeaderError(f"{p}: tensor {name!r} data_offsets [{begin}, {end}] fall outside the "
                          f"{buf}-byte data buffer")
    want = math.prod(shape) * DTYPE_SIZE[dtype]
    if end - begin != want:
        raise HeaderError(f"{p}: tensor {name!r} spans {end - begin} bytes; dtype {dtype} and shape "
                          f"{shape} need {want}")
    return begin, end


def check_file(path: str | os.PathLike[str],
               expected: dict[str, tuple[tuple[int, ...], str | None]] | None = None,
               exact: bool = True) -> dict[str, tuple[tuple[int, ...], str]]:
    """Validate `path`; returns {name: (shape, dtype)}.

    expected: {name: (shape, dtype or None)} from the config; with exact=True the file must hold
    exactly those tensors, else only the listed ones are compared."""
    p = Path(path)
    header, buf = read_header(p)
    spans = []
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, e in header.items():
        spans.append((*_check_entry(p, name, e, buf), name))
        out[name] = (tuple(e["shape"]), e["dtype"])
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise HeaderError(f"{p}: tensor {name!r} {what}")
        pos = end
    if pos != buf:
        raise HeaderError(f"{p}: data buffer has {buf - pos} bytes no tensor accounts for")
    if expected is not None:
        compare(p, out, expected, exact)
    return out


def compare(p: Path, found: dict[str, tuple[tuple[int, ...], str]],
            expected: dict[str, tuple[tuple[int, ...], str | None]], exact: bool = True) -> None:
    for name, (shape, dtype) in expected.items():
        if name not in found:
            raise HeaderError(f"{p}: missing tensor {name!r} that the config needs")
        fs, fd = found[name]
        if fs != tuple(shape):
            raise HeaderError(f"{p}: tensor {name!r} has shape {list(fs)}, config expects {list(shape)}")
        if dtype is not None and fd != dtype:
            raise HeaderError(f"{p}: tensor {name!r} has dtype {fd}, expected {dtype}")
    if exact:
        extra = sorted(set(found) - set(expected))
        if extra:
            raise HeaderError(f"{p}: unexpected tensor {extra[0]!r} ({len(extra)} in all)")
