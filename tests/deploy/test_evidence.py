"""Evidence read from real artifacts: `trustmoe eval`'s eval.json, `data build`'s audit, and the
flat summary block later stages add; mismatched evidence is refused."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from registry_helpers import make_eval, make_model, make_security

from trustmoe.config import get_preset
from trustmoe.deploy.db import RegistryError
from trustmoe.deploy.registry import Registry
from trustmoe.io import sha256_file


@pytest.fixture
def sqlite_reg(tmp_path: Path) -> Registry:
    return Registry.open(tmp_path / "r.db")


WORDS = ("river stone bird flew over quiet valley morning light green hill small house old man "
         "walked slowly along road dog barked children played near water wind rain").split()


@pytest.fixture(scope="module")
def real_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset built by `build_dataset` (with a contamination check that finds one planted
    item), a tiny model saved by `save_model` naming it, and a real `run_eval` of that model."""
    from trustmoe.data.build import BuildOptions, build_dataset
    from trustmoe.eval.runner import Sizes, run_eval
    from trustmoe.model.hf import save_model
    from trustmoe.model.transformer import Transformer

    root = tmp_path_factory.mktemp("real")
    rng = random.Random(0)
    src = root / "src"
    src.mkdir()
    docs = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(60)]
    for i, d in enumerate(docs):
        (src / f"doc{i:03d}.txt").write_text(d + "\n")
    evalset = root / "evalset.jsonl"
    evalset.write_text(json.dumps({"text": " ".join(docs[7].split()[10:35])}) + "\n")
    data = root / "data"
    build_dataset([str(src)], data, BuildOptions(vocab_size=300, eval_sets=(str(evalset),),
                                                 dedup="exact", val_fraction=0.2), progress=False)
    torch.manual_seed(0)
    cfg = get_preset("tiny").model
    model = root / "model"
    save_model(Transformer(cfg).eval(), model, tokenizer_file=data / "tokenizer.json",
               metadata={"dataset_manifest_sha256": sha256_file(data / "manifest.json"),
                         "data_dir": str(data), "train_args": {"lr": 0.001}, "preset": "tiny"})
    ev = root / "eval"
    sizes = Sizes(n_val=8, n_train=6, max_tokens=48, n_task=4, n_robust=2, n_attack=1,
                  attack_subs=1, attack_candidates=2, n_calib_docs=2, calib_tokens=24)
    run_eval(model, data, ev, progress=False, sizes=sizes, batch_size=8)
    return {"data": data, "model": model, "eval": ev}


@pytest.mark.slow
def test_real_eval_json_and_dataset_audit_feed_the_gates(real_artifacts: dict[str, Path],
                                                         tmp_path: Path) -> None:
    reg = Registry.open(tmp_path / "r.db")
    v = reg.add(real_artifacts["model"], "tiny", eval_dir=real_artifacts["eval"])
    res = json.loads((real_artifacts["eval"] / "eval.json").read_text())
    met, missing = v.metadata["metrics"], v.metadata["metrics_missing"]
    assert met["perplexity"] == res["perplexity"]["perplexity"]
    assert met["ece"] == res["summary"]["ece"]  # as served: T = 1
    assert met["ece"] == res["calibration"]["next_token"]["test_before"]["ece_15_equal_width"]
    assert met["ece_after_temperature"] == res["summary"]["ece_after_temperature"]
    assert met["membership_max_auroc"] == res["summary"]["membership_auroc"]
    assert met["attack_success_rate"] == res["attack"]["attack_success_rate"]
    assert "perplexity" not in missing and "ece" not in missing
    # contamination: found through the model's data_dir, whose manifest matches its sha256
    assert met["contamination_hits"] == 1
    assert v.metadata["dataset_audit"]["contamination_checked_items"] == 1
    assert v.metadata["dataset_manifest_sha256"] == sha256_file(
        real_artifacts["data"] / "manifest.json")
    from trustmoe.deploy.aliases import GateRefusal

    with pytest.raises(GateRefusal, match="contamination_hits: 1 > 0"):
        reg.promote("tiny", 1, "production")


def test_summary_block_wins_and_security_summary(sqlite_reg: Registry, tmp_path: Path) -> None:
    m = make_model(tmp_path / "m")
    e = make_eval(tmp_path / "e", model=m, perplexity=50.0, summary={
        "perplexity": 12.0, "ece": 0.02, "contamination_hits": 0,
        "quantized_perplexity_delta": 0.004})
    s = tmp_path / "s"
    s.mkdir()
    (s / "security.json").write_text(json.dumps({"summary": {"findings": 0, "max_severity": "none",
                                                             "canary_exposure_max": 3.5}}))
    v = sqlite_reg.add(m, "demo", eval_dir=e, security_dir=s)
    met = v.metadata["metrics"]
    assert (met["perplexity"], met["ece"], met["contamination_hits"]) == (12.0, 0.02, 0)
    assert met["quantized_perplexity_delta"] == 0.004
    assert met["security_max_severity"] == "none" and met["canary_exposure_max"] == 3.5
    assert v.metadata["security"]["summary"]["findings"] == 0
    res = sqlite_reg.promote("demo", 1, "production")
    assert [r.status for r in res.report.results] == ["pass"] * 5


def test_mismatched_or_broken_evidence_is_refused(sqlite_reg: Registry, tmp_path: Path) -> None:
    m = make_model(tmp_path / "m", seed=1)
    other = make_model(tmp_path / "other", seed=2)
    e = make_eval(tmp_path / "e", model=other)
    with pytest.raises(RegistryError, match="evaluated other weights"):
        sqlite_reg.add(m, "demo", eval_dir=e)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "eval.json").write_text("{not json")
    with pytest.raises(RegistryError, match=r"eval\.json is not valid JSON"):
        sqlite_reg.add(m, "demo", eval_dir=bad)
    noeval = tmp_path / "noeval"
    noeval.mkdir()
    (noeval / "report.html").write_text("x")
    with pytest.raises(RegistryError, match="not an eval dir"):
        sqlite_reg.add(m, "demo", eval_dir=noeval)
    with pytest.raises(RegistryError, match="not a security dir"):
        sqlite_reg.add(m, "demo", security_dir=noeval)
    assert sqlite_reg.models() == []  # nothing registered by any refusal


def test_findings_list_gives_worst_severity(sqlite_reg: Registry, tmp_path: Path) -> None:
    m = make_model(tmp_path / "m")
    s = make_security(tmp_path / "s", [{"severity": "info"}, {"severity": "HIGH"}, {"x": 1}])
    v = sqlite_reg.add(m, "demo", security_dir=s)
    assert v.metadata["metrics"]["security_max_severity"] == "high"
    assert v.metadata["metrics"]["security_findings"] == 3


def test_dataset_dir_must_match_the_models_manifest(sqlite_reg: Registry, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"options": {"decontaminate": True}}))
    (data / "audit.json").write_text(json.dumps({"contamination": [{"item": 1}],
                                                 "contamination_index": {"items": 4}}))
    m = make_model(tmp_path / "m", dataset_sha="cd" * 32)  # names another dataset
    v = sqlite_reg.add(m, "demo", data_dir=data)
    assert "dataset_audit" not in v.metadata and "contamination_hits" in v.metadata["metrics_missing"]
    m2 = make_model(tmp_path / "m2", seed=3, dataset_sha=sha256_file(data / "manifest.json"))
    v2 = sqlite_reg.add(m2, "demo", data_dir=data)
    assert v2.metadata["metrics"]["contamination_hits"] == 0  # decontaminated: hits were dropped
    shutil.rmtree(data)
