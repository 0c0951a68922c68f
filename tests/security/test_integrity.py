"""integrity.py: manifests on every artifact writer, and refusal of any difference on load."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import trustmoe
from trustmoe.config import get_preset
from trustmoe.model import Transformer, save_model
from trustmoe.security.integrity import (
    MANIFEST,
    IntegrityError,
    check_on_load,
    refresh_manifest,
    verify_dir,
    write_manifest,
)


@pytest.fixture()
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRUSTMOE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    d = tmp_path / "model"
    save_model(Transformer(get_preset("tiny").model), d)
    return d


def test_save_writes_a_manifest_that_verifies(model_dir: Path) -> None:
    entries = json.loads((model_dir / MANIFEST).read_text())["files"]
    assert set(entries) == {"config.json", "generation_config.json", "model.safetensors", "trustmoe.json"}
    res = verify_dir(model_dir)
    assert res.ok and res.hashed == 4
    trustmoe.load(model_dir)


@pytest.mark.parametrize("tamper, kind, name", [
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace("64", "65", 1)),
     "changed", "config.json"),
    (lambda d: (d / "trustmoe.json").unlink(), "missing", "trustmoe.json"),
    (lambda d: (d / "extra.py").write_text("print('hi')"), "extra", "extra.py"),
    (lambda d: (d / "pytorch_model.bin").write_bytes(b"\x80\x04."), "extra", "pytorch_model.bin"),
    (lambda d: (d / "link.json").symlink_to(d / "config.json"), "symlink", "link.json"),
    (lambda d: ((d / "sub").mkdir(), (d / "sub" / "x").write_text("1")), "extra", "sub/x"),
])
def test_any_difference_is_refused_with_its_name(model_dir: Path, tamper: object, kind: str,
                                                 name: str) -> None:
    tamper(model_dir)  # type: ignore[operator]
    res = verify_dir(model_dir)
    assert not res.ok and any(p.kind == kind and p.name == name for p in res.problems), res.problems
    with pytest.raises(IntegrityError, match=re.escape(f"{kind}: {name}")):
        trustmoe.load(model_dir)


def test_same_size_change_is_caught_after_a_fast_load(model_dir: Path) -> None:
    check_on_load(model_dir)  # first load hashes and fills the local cache
    again = check_on_load(model_dir)
    assert again.hashed == 0  # fast path: size, mtime, inode, ctime unchanged
    p = model_dir / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1  # same size, different content
    st = p.stat()
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime (ctime moves)
    with pytest.raises(IntegrityError, match=r"changed: model\.safetensors"):
        check_on_load(model_dir)
    monkey = verify_dir(model_dir, full=True)
    assert not monkey.ok


@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/passwd", "a/../../b", "./x", "a\\b", ""])
def test_manifest_entries_outside_the_dir_are_refused(model_dir: Path, entry: str) -> None:
    m = json.loads((model_dir / MANIFEST).read_text())
    m["files"][entry] = {"size": 1, "sha256": "0" * 64}
    (model_dir / MANIFEST).write_text(json.dumps(m))
    res = verify_dir(model_dir)
    assert not res.ok and res.problems[0].kind == "manifest" and "outside" in res.problems[0].detail
    with pytest.raises(IntegrityError, match="outside"):
        check_on_load(model_dir)


def test_malformed_manifest(model_dir: Path) -> None:
    (model_dir / MANIFEST).write_text("{nope")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        check_on_load(model_dir)
    (model_dir / MANIFEST).write_text('{"format": "x", "files": {}}')
    with pytest.raises(IntegrityError, match="not a trustmoe-files"):
        check_on_load(model_dir)


def test_foreign_dir_loads_with_a_warning(model_dir: Path) -> None:
    (model_dir / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="no integrity.json"):
        trustmoe.load(model_dir)
    assert not verify_dir(model_dir).ok


def test_refresh_after_in_place_edit(model_dir: Path) -> None:
    meta = json.loads((model_dir / "trustmoe.json").read_text())
    meta["calibration"] = {"temperature": 1.1}
    (model_dir / "trustmoe.json").write_text(json.dumps(meta))
    assert not verify_dir(model_dir).ok
    refresh_manifest(model_dir, ["trustmoe.json"])
    assert verify_dir(model_dir).ok


def test_symlinked_subdir_and_write_refusal(tmp_path: Path) -> None:
    d = tmp_path / "a"
    d.mkdir()
    (d / "f").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (d / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(IntegrityError, match="symlink: sub"):
        write_manifest(d)
    (d / "sub").unlink()
    write_manifest(d)
    assert verify_dir(d).ok


def test_every_writer_leaves_a_manifest(tmp_path: Path, tiny_data_dir: Path) -> None:
    """Dataset dirs (data build), model dirs, checkpoints (train), eval dirs, quantized dirs."""
    import random

    from trustmoe.data.build import BuildOptions, build_dataset
    from trustmoe.engine import Engine
    from trustmoe.engine.artifact import save_quantized
    from trustmoe.eval.runner import _write
    from trustmoe.train.checkpoint import save_checkpoint

    rng = random.Random(0)
    src = tmp_path / "src"
    src.mkdir()
    words = "alpha beta gamma delta river stone cloud paper green quiet number table".split()
    for i in range(12):
        (src / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(150)))
    data = build_dataset([str(src)], tmp_path / "data", BuildOptions(vocab_size=300, license="MIT"),
                         progress=False).out_dir
    assert verify_dir(data).ok
    m = tmp_path / "m"
    model = Transformer(get_preset("tiny").model)
    save_model(model, m, tokenizer_file=tiny_data_dir / "tokenizer.json")
    assert verify_dir(m).ok and (m / "tokenizer_config.json").exists()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "ckpt", model, opt, tiny_data_dir / "tokenizer.json", {}, {"step": 0}, None)
    ck = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())["files"]
    assert verify_dir(tmp_path / "ckpt").ok and "train_state.safetensors" in ck
    _write(tmp_path / "eval", {"x": 1}, None, {}, lambda d, r, o: (d / "report.html").write_text("<p>"))
    assert verify_dir(tmp_path / "eval").ok
    q = save_quantized(Engine(m, quantize="int8", kv_cache_mb=4).weights, tmp_path / "q", m)
    assert verify_dir(q).ok
    shutil.copytree(q, tmp_path / "q2")
    assert verify_dir(tmp_path / "q2").ok  # a copy verifies (hashes, not mtimes, decide)
