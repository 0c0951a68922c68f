"""Token shards: `train.bin` / `val.bin` are flat numpy arrays of token ids (memmap-able).

Documents are concatenated with the EOS id between them. dtype is uint16 when the
vocabulary fits, else uint32; it is recorded in `manifest.json` under "tokens" and, when no
manifest exists, inferred from the tokenizer's vocabulary size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from trustmoe.io import TrustmoeError
from trustmoe.security.integrity import check_on_load

SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: str | Path, ids: np.ndarray, vocab_size: int) -> dict[str, Any]:
    """Write ids atomically; return a summary for the manifest's "tokens" entry."""
    path = Path(path)
    arr = np.asarray(ids).astype(token_dtype(vocab_size), copy=False)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        arr.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "tokens": int(arr.size), "dtype": arr.dtype.name}


def open_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """Memory-map a split's tokens; raises TrustmoeError with one clear line on any problem."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise TrustmoeError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = data_dir / f"{split}.bin"
    if not data_dir.is_dir():
        raise TrustmoeError(f"data directory not found: {data_dir}")
    check_on_load(data_dir, "dataset")  # refuses a changed, missing, extra or symlinked file
    if not path.exists():
        raise TrustmoeError(f"{path} is missing; build the dataset with `trustmoe data build`")
    dtype = _dtype_for(data_dir)
    if path.stat().st_size == 0:
        raise TrustmoeError(f"{path} is empty: the dataset has no {split} tokens")
    if path.stat().st_size % dtype.itemsize:
        raise TrustmoeError(f"{path} size is not a multiple of {dtype.name}: the file is corrupt")
    return np.memmap(path, dtype=dtype, mode="r")


def _dtype_for(data_dir: Path) -> np.dtype[Any]:
    manifest = data_dir / "manifest.json"
    if manifest.exists():
        try:
            tokens = json.loads(manifest.read_text()).get("tokens", {})
        except json.JSONDecodeError:
            raise TrustmoeError(f"{manifest} is malformed JSON") from None
        if "dtype" in tokens:
            return np.dtype(tokens["dtype"])
    tok = data_dir / "tokenizer.json"
    if not tok.exists():
        raise TrustmoeError(f"{tok} is missing: cannot tell the token dtype")
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    added = json.loads(tok.read_text()).get("added_tokens", [])
    return token_dtype(max(len(vocab), len(added)))
