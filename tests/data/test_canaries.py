"""Canaries: planted in the training split only, the exact number of times, recorded in
canaries.json and flagged in the manifest, without touching the tokenizer; bad options refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_corpus import small_options

from trustmoe.data import canaries as C
from trustmoe.data.build import build_dataset
from trustmoe.data.manifest import verify
from trustmoe.data.shards import open_tokens
from trustmoe.data.tokenizer import load_tokenizer
from trustmoe.io import TrustmoeError


def _count(hay: np.ndarray, needle: list[int]) -> int:
    n = len(needle)
    win = np.lib.stride_tricks.sliding_window_view(np.asarray(hay, dtype=np.int64), n)
    return int((win == np.asarray(needle)).all(1).sum())


def test_make_canaries_is_deterministic_and_random() -> None:
    opts = C.CanaryOptions(count=3, repeats=(1, 10), seed=5)
    a, b = C.make_canaries(opts), C.make_canaries(opts)
    assert a == b and len(a) == 6
    assert [c.repeats for c in a] == [1, 1, 1, 10, 10, 10]
    assert len({c.prefix for c in a}) == 6 and len({c.secret for c in a}) == 6
    assert all(len(c.secret.split()) == 9 and c.secret.replace(" ", "").isdigit() for c in a)
    assert C.make_canaries(C.CanaryOptions(count=3, repeats=(1, 10), seed=6)) != a


def test_insert_keeps_order_of_real_documents() -> None:
    kept = [(f"d{i}", f"text {i}") for i in range(20)]
    out = C.insert(kept, C.CanaryOptions(count=2, repeats=(1, 3)))
    assert len(out) == 20 + 2 * 1 + 2 * 3
    assert [d for d in out if not C.is_canary_id(d[0])] == kept


def test_build_with_canaries(corpus: Path, tmp_path: Path) -> None:
    plain = build_dataset([str(corpus)], tmp_path / "plain", small_options(), progress=False)
    opts = small_options(canaries=C.CanaryOptions(count=2, repeats=(1, 5)))
    res = build_dataset([str(corpus)], tmp_path / "ds", opts, progress=False)
    out = tmp_path / "ds"
    man = json.loads((out / "manifest.json").read_text())
    assert man["canaries"] == {"file": "canaries.json", "count": 4, "per_repeat": 2,
                               "repeats": [1, 5], "documents_inserted": 12, "split": "train"}
    assert "canaries.json" in man["outputs"]
    assert json.loads((tmp_path / "plain/manifest.json").read_text())["canaries"] is None
    assert not (tmp_path / "plain/canaries.json").exists()
    # the tokenizer is trained before the canaries go in
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "plain/tokenizer.json").read_bytes()
    recorded = C.load(out)
    assert recorded == C.make_canaries(opts.canaries)
    tok = load_tokenizer(out)
    train, val = open_tokens(out, "train"), open_tokens(out, "val")
    for c in recorded:
        ids = tok.encode(c.text).ids
        assert _count(train, ids) == c.repeats
        assert _count(val, ids) == 0
    assert len(train) > len(open_tokens(tmp_path / "plain", "train"))
    assert res.stats["tokens"]["val"] == plain.stats["tokens"]["val"]
    assert verify(out)["ok"]


def test_dataset_without_canaries_loads_empty(tmp_path: Path) -> None:
    assert C.load(tmp_path) == []
    (tmp_path / "canaries.json").write_text('{"format": "other"}')
    with pytest.raises(TrustmoeError, match="not a trustmoe canary file"):
        C.load(tmp_path)


@pytest.mark.parametrize(("opts", "msg"), [
    (C.CanaryOptions(count=-1), "--canaries must be in"),
    (C.CanaryOptions(count=1, repeats=(0,)), "--canary-repeats must be in"),
    (C.CanaryOptions(count=1, repeats=(2, 2)), "duplicates"),
    (C.CanaryOptions(count=1, digits=1), "digits must be in"),
])
def test_bad_canary_options(opts: C.CanaryOptions, msg: str) -> None:
    with pytest.raises(TrustmoeError, match=msg):
        opts.validate()


def test_cli_bad_repeats_is_one_line(corpus: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "trustmoe.cli", "data", "build", str(corpus),
                        "--out", str(tmp_path / "ds"), "--canaries", "2",
                        "--canary-repeats", "1,ten"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--canary-repeats must be comma-separated" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "ds").exists()
