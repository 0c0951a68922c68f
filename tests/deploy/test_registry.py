"""The registry on both backends: versions, evidence, resolve, aliases in time, append-only
history, migrations."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from registry_helpers import make_eval, make_model, make_security, open_policy

from trustmoe.deploy.blobs import manifest_digest
from trustmoe.deploy.db import RegistryError
from trustmoe.deploy.records import NotFoundError
from trustmoe.deploy.registry import Registry
from trustmoe.io import sha256_file

OPEN = open_policy()


def test_add_records_evidence_and_digest(reg: Registry, tmp_path: Path) -> None:
    m = make_model(tmp_path / "m", seed=1)
    e = make_eval(tmp_path / "e", model=m, perplexity=11.5, ece=0.03, profile=True)
    s = make_security(tmp_path / "s", [{"severity": "low"}, {"severity": "medium"}])
    v = reg.add(m, "demo", eval_dir=e, security_dir=s, why="first try", by="ann@box")
    assert v.version == 1 and v.created_by == "ann@box" and v.why == "first try"
    files = sorted(p.name for p in m.iterdir())
    want = hashlib.sha256("".join(f"{sha256_file(m / f)}  {f}\n" for f in files).encode()).hexdigest()
    assert v.digest == want  # sha256sum-style manifest, sorted by path
    meta = v.metadata
    assert meta["dataset_manifest_sha256"] == "ab" * 32
    assert meta["train_args"] == {"lr": 0.001} and meta["training"]["preset"] == "tiny"
    assert meta["metrics"]["perplexity"] == 11.5 and meta["metrics"]["ece"] == 0.03
    assert meta["metrics"]["security_findings"] == 2
    assert meta["metrics"]["security_max_severity"] == "medium"
    assert meta["eval"]["has_profile"] is True
    assert "quantized_perplexity_delta" in meta["metrics_missing"]
    assert meta["files"]["model"]["count"] == 4
    # the whole eval dir is stored: profile files come back with the version
    r = reg.resolve("demo@1")
    assert r.eval_path is not None and (r.eval_path / "profile.safetensors").is_file()
    assert r.security_path is not None and (r.security_path / "security.json").is_file()


def test_versions_share_blobs_and_identical_add_is_not_duplicated(reg: Registry, tmp_path: Path
                                                                  ) -> None:
    m1 = make_model(tmp_path / "m1", seed=1)
    v1 = reg.add(m1, "demo")
    m2 = make_model(tmp_path / "m2", seed=2)  # same config/tokenizer, other weights
    v2 = reg.add(m2, "demo")
    assert (v1.version, v2.version) == (1, 2) and v1.digest != v2.digest
    assert len(reg.store.all_blobs()) == 4 + 2  # 4 files of v1, then only 2 changed files
    again = reg.add(m1, "demo")
    assert again.version == 1  # every file identical to v1: no new version
    assert [v.version for v in reg.versions("demo")] == [1, 2]


def test_resolve_gives_verified_read_only_shared_tree(reg: Registry, tmp_path: Path) -> None:
    m = make_model(tmp_path / "m")
    reg.add(m, "demo")
    reg.promote("demo", 1, "production", why="first", policy=OPEN)
    a = reg.resolve("registry:demo@production")
    b = reg.resolve("demo@1")
    assert a.path == b.path and a.path.name == a.digest  # content-addressed: one tree per digest
    assert (a.version, a.alias, b.alias) == (1, "production", None)
    for f in m.iterdir():
        assert (a.path / f.name).read_bytes() == f.read_bytes()
        assert not os.stat(a.path / f.name).st_mode & 0o222
    assert a.header() == f"demo@1 sha256:{a.digest}"
    import trustmoe.model.hf as hf  # the tree loads like any model dir (safetensors only)

    assert "model.embed_tokens.weight" in hf.read_safetensors(a.path)


def test_unknown_names_versions_aliases(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="registry is empty"):
        reg.get("nope")
    reg.add(make_model(tmp_path / "m"), "demo")
    with pytest.raises(NotFoundError, match=r"unknown model 'nope' \(known: demo\)"):
        reg.resolve("nope@1")
    with pytest.raises(NotFoundError, match=r"unknown version demo@5 \(versions 1\.\.1\)"):
        reg.get("demo@5")
    with pytest.raises(NotFoundError, match="points at no version"):
        reg.resolve("demo@production")
    with pytest.raises(NotFoundError, match="unknown version"):
        reg.promote("demo", 3, "production", policy=OPEN)
    for bad in ("de mo", "demo@Prod", "demo@0", "@1", "demo@"):
        with pytest.raises(RegistryError):
            reg.get(bad)


def test_digest_is_manifest_of_file_records(reg: Registry, tmp_path: Path) -> None:
    v = reg.add(make_model(tmp_path / "m"), "demo")
    assert manifest_digest(reg.files("demo", 1)) == v.digest
    assert reg.verify().ok


def test_checkpoint_optimizer_state_is_left_out_unless_asked(reg: Registry, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from trustmoe.deploy.registry import TRAIN_STATE
    from trustmoe.train.checkpoint import STATE_FILE

    assert TRAIN_STATE == STATE_FILE
    m = make_model(tmp_path / "m")
    save_file({"exp_avg": torch.zeros(64)}, str(m / STATE_FILE))
    v1 = reg.add(m, "demo")
    assert STATE_FILE not in {e.path for e in reg.files("demo", 1)}
    v2 = reg.add(m, "demo", train_state=True)
    assert v2.version == 2 and v2.digest != v1.digest
    assert STATE_FILE in {e.path for e in reg.files("demo", 2)}
