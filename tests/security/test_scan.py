"""`trustmoe security scan`: security.json (keys, intervals, summary), security.html, and bad
input (mismatched model and data, no canaries for exposure, bad options) as one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trustmoe.io import TrustmoeError
from trustmoe.security.backdoor import BackdoorOptions
from trustmoe.security.integrity import write_manifest
from trustmoe.security.scan import ScanOptions, read_summary, run_scan

SUMMARY_KEYS = {"max_exposure", "max_exposure_repeats", "canaries_extracted", "mia_auroc",
                "mia_best_attack", "mia_tpr_at_1pct_fpr", "extraction_excess_exact_rate",
                "backdoor_suspects", "data_poisoning_findings", "dp_epsilon", "findings_level"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustmoe.cli", "security", "scan", *args],
                          capture_output=True, text=True, timeout=280)


@pytest.mark.slow
def test_scan_writes_report(audit_world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sec"
    r = _cli(str(audit_world["model"]), "--data", str(audit_world["data"]), "--out", str(out),
             "--chunks", "40", "--chunk-tokens", "64", "--candidates", "300",
             "--reference-steps", "20", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert set(summary) == SUMMARY_KEYS
    res = json.loads((out / "security.json").read_text())
    assert {"format", "model", "data", "settings", "summary", "exposure", "extraction",
            "membership", "backdoor", "timing_s"} <= set(res)
    assert res["summary"] == summary == read_summary(out)
    assert summary["findings_level"] in ("none", "low", "medium", "high")
    assert summary["max_exposure_repeats"] == 40
    by = res["exposure"]["by_repeats"]
    assert set(by) == {"1", "40"} and by["40"]["exposure"]["value"] > by["1"]["exposure"]["value"]
    for att in res["membership"]["attacks"].values():
        lo, hi = att["auroc"]["ci95"]
        assert lo <= att["auroc"]["value"] <= hi
    assert res["membership"]["reference_model"]["source"].startswith("trained by the scan")
    assert res["membership"]["nonmembers"] < res["data"]["val_chunks"]  # half went to the reference
    assert (out / "reference" / "model.safetensors").exists()
    bd = res["backdoor"]  # calibrated on every held-out chunk; 40 are too few for FPR 1%
    # the backdoor screen samples wider (--backdoor-chunks, 5000: every chunk here)
    assert res["data"]["backdoor_val_chunks"] > res["data"]["val_chunks"] == 40
    assert bd["chunks"] == res["data"]["backdoor_train_chunks"] > res["data"]["train_chunks"]
    assert bd["null"] == {"chunks": res["data"]["backdoor_val_chunks"], "fpr": 0.01,
                          "source": "held-out", "min_p": round(1 / (bd["null"]["chunks"] + 1), 6),
                          "representation_detectors": "out of fold", "trigger_search_to_beat": None}
    assert bd["note"] is not None and "too few" in bd["note"] and not bd["flagged"]["trigger_search"]
    for k in ("spectral", "activation_clustering", "expert_spectral"):  # out of fold: ~1% each
        assert bd["flagged"][k] <= 0.01 * bd["chunks"] + 1, k
    html = (out / "security.html").read_text()
    assert "data:image/png;base64," in html and summary["findings_level"] in html
    # the registry's gates read this summary as the version's evidence
    from trustmoe.deploy.registry import Registry

    with Registry.open(tmp_path / "r.db") as reg:
        met = reg.add(audit_world["model"], "m", security_dir=out).metadata["metrics"]
    assert met["security_max_severity"] == summary["findings_level"]
    assert met["canary_exposure_max"] == summary["max_exposure"]
    assert met["mia_auroc"] == summary["mia_auroc"]
    assert met["backdoor_suspects"] == summary["backdoor_suspects"]


def test_dataset_without_canaries_refuses_exposure(audit_world: dict[str, Path],
                                                   tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(audit_world["data"], data)
    (data / "canaries.json").unlink()
    man = json.loads((data / "manifest.json").read_text())
    man["canaries"] = None
    (data / "manifest.json").write_text(json.dumps(man))
    model = tmp_path / "model"
    shutil.copytree(audit_world["model"], model)
    meta = json.loads((model / "trustmoe.json").read_text())
    meta["dataset_manifest_sha256"] = None  # a model that does not name its dataset
    (model / "trustmoe.json").write_text(json.dumps(meta))
    for d in (data, model):  # edited on purpose: re-hash, or loading refuses them as tampered
        write_manifest(d)
    r = _cli(str(model), "--data", str(data), "--out", str(tmp_path / "sec"),
             "--check", "exposure")
    assert r.returncode == 2 and "has no canaries" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and not (tmp_path / "sec").exists()


def test_manifest_mismatch_is_refused(audit_world: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(audit_world["data"], data)
    man = json.loads((data / "manifest.json").read_text())
    man["options"]["seed"] = 99  # another dataset
    (data / "manifest.json").write_text(json.dumps(man))
    r = _cli(str(audit_world["model"]), "--data", str(data), "--out", str(tmp_path / "sec"))
    assert r.returncode == 2 and "was trained on dataset" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_tokenizer_mismatch_is_refused(audit_world: dict[str, Path], tiny_data_dir: Path,
                                       tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(audit_world["model"], model)
    meta = json.loads((model / "trustmoe.json").read_text())
    meta["dataset_manifest_sha256"] = None
    (model / "trustmoe.json").write_text(json.dumps(meta))
    data = tmp_path / "data"
    shutil.copytree(audit_world["data"], data)
    shutil.copyfile(tiny_data_dir / "tokenizer.json", data / "tokenizer.json")
    with pytest.raises(TrustmoeError, match="different tokenizers"):
        run_scan(model, data, tmp_path / "sec", progress=False)


@pytest.mark.parametrize(("opts", "msg"), [
    (ScanOptions(checks=("privacy",)), "unknown check"),
    (ScanOptions(n_chunks=1), "--chunks must be in"),
    (ScanOptions(chunk_tokens=4), "--chunk-tokens must be in"),
    (ScanOptions(reference_steps=0), "--reference-steps must be"),
    (ScanOptions(backdoor=BackdoorOptions(fpr=0.0)), "backdoor fpr must be in"),
])
def test_bad_options(opts: ScanOptions, msg: str) -> None:
    with pytest.raises(TrustmoeError, match=msg):
        opts.validate()


def test_missing_inputs_are_one_line(tmp_path: Path) -> None:
    r = _cli(str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "model directory not found" in r.stderr


def test_backdoor_section_ranks_trigger_finds_first_and_groups_documents(tmp_path: Path) -> None:
    import numpy as np

    from trustmoe.security.scan import backdoor_section

    n = 5
    flags = {d: np.zeros(n, dtype=bool) for d in ("spectral", "activation_clustering",
                                                   "expert_spectral", "trigger_search")}
    flags["spectral"][[0, 4]] = flags["activation_clustering"][[0, 4]] = True  # two detectors
    flags["trigger_search"][[1, 2, 3]] = True
    scores = {d: np.arange(n, dtype=float) for d in flags}
    scores["trigger_search"] = np.array([0.0, 5.0, 9.0, 9.0, 0.0])
    ev = [{}, {"trigger": "zq", "payload": " rm"}, {"trigger": "vex", "payload": " rm -rf", "score": 9.0},
          {"trigger": "vex", "payload": " rm -rf", "score": 9.0}, {}]
    out = {"scores": scores, "flags": flags, "evidence": ev,
           "p": {d: np.where(f, 0.005, 0.5) for d, f in flags.items()},
           "null": {"chunks": 300, "fpr": 0.01, "source": "held-out", "min_p": 0.003322}}
    sec = backdoor_section(out, ["train:7:0", "train:3:0", "train:9:0", "train:9:1", "train:2:0"])
    assert sec["suspect_count"] == 5 and sec["note"] is None
    assert [s["chunk"] for s in sec["suspects"]][:3] == ["train:9:0", "train:9:1", "train:3:0"]
    docs = sec["suspect_documents"]
    assert [d["document"] for d in docs] == ["train:9", "train:3", "train:7", "train:2"]
    assert docs[0]["chunks"] == ["train:9:0", "train:9:1"] and docs[0]["evidence"]["trigger"] == "vex"
    assert docs[2]["flagged_by"] == ["activation_clustering", "spectral"]
    from trustmoe.security.scan_report import write_report

    sec["null"]["trigger_search_to_beat"] = 7.5  # the bar, and each suspect's score, in the page
    res = {"model": {"dir": "m", "weights_sha256": "0" * 64}, "settings": {"seed": 0},
           "data": {"dir": "d", "manifest_sha256": "0" * 64}, "summary": {"findings_level": "low"},
           "timing_s": {}, "backdoor": sec}
    html = write_report(tmp_path, res).read_text()
    assert "a\nscore above 7.5." in html and "score 9.0;" in html
