"""Every metric family runs on every backend (model, engine, OpenAI server); engine and model
give the same numbers; a quantized engine is measured against fp32; what a backend cannot
give is written down, not skipped silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from trustmoe.eval.report import flatten
from trustmoe.eval.runner import Sizes, run_eval

TINY = Sizes(n_val=8, n_train=6, max_tokens=48, n_task=4, n_robust=2, n_attack=1,
             attack_subs=1, attack_candidates=3, n_calib_docs=3, calib_tokens=24, n_extract=3)
FAMILIES = ("perplexity", "tasks", "calibration", "ood", "robustness", "attack", "membership",
            "contamination", "moe", "quantization", "summary", "backend")
SUMMARY_KEYS = {
    "backend", "quantize", "estimated_distribution", "perplexity", "perplexity_ci95_low",
    "perplexity_ci95_high", "bits_per_byte", "ece", "ece_ci95_low", "ece_ci95_high",
    "ece_after_temperature", "temperature", "accuracy", "accuracy_ci95_low", "accuracy_ci95_high",
    "ood_auroc", "ood_auroc_ci95_low", "ood_auroc_ci95_high", "membership_auroc",
    "attack_success_rate", "contamination_hits", "dataset_contamination_hits",
    "extraction_exact_train", "extraction_exact_heldout", "fp32_perplexity",
    "quantized_perplexity_delta"}


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("mb") / "model"
    shutil.copytree(model_dir, d)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, model_copy: Path, data_dir: Path,
         served: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    base = tmp_path_factory.mktemp("runs")
    for name, kw in (("model", dict(backend="model")), ("engine", dict(backend="engine")),
                     ("openai", dict(model_url=served.url, tokenizer=model_copy)),
                     ("int8", dict(backend="engine", quantize="int8"))):
        model = None if name == "openai" else model_copy
        run_eval(model, data_dir, base / name, progress=False, sizes=TINY, batch_size=4,
                 store_temperature=name == "engine", **kw)  # type: ignore[arg-type]
        out[name] = json.loads((base / name / "eval.json").read_text())
        out[name]["_html"] = (base / name / "report.html").read_text()
    return out


@pytest.mark.parametrize("backend", ["model", "engine", "openai", "int8"])
def test_every_family_runs(runs: dict[str, dict[str, Any]], backend: str) -> None:
    res = runs[backend]
    for fam in FAMILIES:
        assert fam in res, fam
    s = res["summary"]
    assert set(s) == SUMMARY_KEYS
    assert s["backend"] == {"int8": "engine"}.get(backend, backend)
    assert s["perplexity_ci95_low"] <= s["perplexity"] <= s["perplexity_ci95_high"]
    assert s["ece_ci95_low"] <= s["ece"] <= s["ece_ci95_high"]
    assert s["accuracy_ci95_low"] <= s["accuracy"] <= s["accuracy_ci95_high"]
    assert s["contamination_hits"] == res["contamination"]["hits"] >= 0
    assert res["contamination"]["train_documents_scanned"] == 60
    assert res["membership"]["extraction"]["members"]["n"] == 3
    assert res["tasks"] and res["robustness"] and res["ood"]
    limits = res["backend"]["limits"]
    html = res["_html"]
    assert "95% CI" in html and "backend" in html
    if backend == "model":
        assert limits == {} and res["moe"]["id"]["layers"] and res["attack"]["method"] == "gradient"
    else:  # engine and server: no routing, no hidden states, black-box attack -- all said so
        assert {"hidden", "routing", "gradients"} <= set(limits)
        assert res["moe"]["id"] == {} and res["moe"]["unavailable"]
        assert res["attack"]["method"] == "black-box"
        assert "mahalanobis" not in res["ood"]["char-noise"]["scores"]
        assert "not measured on this backend" in html and limits["routing"] in html
    if backend == "openai":
        assert s["estimated_distribution"] and res["calibration"]["next_token"]["estimated"]
        assert {"energy", "max_logit"}.isdisjoint(res["ood"]["char-noise"]["scores"])
        assert "estimated from top-k" in html
    else:
        assert not s["estimated_distribution"]


def test_engine_and_model_agree(runs: dict[str, dict[str, Any]]) -> None:
    a, b = flatten(runs["model"]), flatten(runs["engine"])
    skip = ("attack.", "summary.attack", "summary.ood_", "timing_s", "settings.")
    keys = [k for k in set(a) & set(b) if not k.startswith(skip)
            and not (k.startswith("ood.") and "ci95" in k)]
    assert len(keys) > 150
    assert abs(b["perplexity.perplexity"] / a["perplexity.perplexity"] - 1) < 1e-4
    for k in keys:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4), k


def test_server_agrees_on_exact_numbers(runs: dict[str, dict[str, Any]]) -> None:
    e, o = runs["engine"]["summary"], runs["openai"]["summary"]
    assert abs(o["perplexity"] / e["perplexity"] - 1) < 1e-4
    assert o["bits_per_byte"] == pytest.approx(e["bits_per_byte"], rel=1e-4)
    assert o["accuracy"] == pytest.approx(e["accuracy"], abs=1e-9)


def test_int8_is_measured_against_fp32(runs: dict[str, dict[str, Any]], model_copy: Path
                                       ) -> None:
    q, e = runs["int8"]["summary"], runs["engine"]["summary"]
    assert q["quantize"] == "int8" and e["quantize"] is None and e["fp32_perplexity"] is None
    assert q["fp32_perplexity"] == pytest.approx(e["perplexity"], rel=1e-6)
    assert q["perplexity"] != e["perplexity"]
    assert q["quantized_perplexity_delta"] == pytest.approx(
        q["perplexity"] / q["fp32_perplexity"] - 1, rel=1e-9)
    assert 0 < abs(q["quantized_perplexity_delta"]) < 0.02
    assert "int8 vs fp32 perplexity" in runs["int8"]["_html"]
    # the temperature stored in the model dir is the fp32 engine's, never the quantized one's
    meta = json.loads((model_copy / "trustmoe.json").read_text())
    assert meta["calibration"]["backend"] == "engine"
    assert meta["calibration"]["temperature"] == pytest.approx(e["temperature"], abs=1e-9)
