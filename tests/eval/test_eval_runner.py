"""End to end: eval.json + report.html, determinism, batch-size invariance, bad input, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from trustmoe.eval.report import compare_rows, flatten
from trustmoe.eval.runner import Sizes, run_eval
from trustmoe.io import TrustmoeError

SMALL = Sizes(n_val=16, n_train=10, max_tokens=64, n_task=6, n_robust=4, n_attack=2,
              attack_subs=1, attack_candidates=4, n_calib_docs=4, calib_tokens=32)


def _numbers(path: Path) -> dict[str, float]:
    res = json.loads((path / "eval.json").read_text())
    return {k: v for k, v in flatten(res).items()}


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("m") / "model"
    shutil.copytree(model_dir, d)
    return d


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, model_copy: Path, data_dir: Path
              ) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("e") / "eval1"
    summary = run_eval(model_copy, data_dir, out, backend="model", progress=False, sizes=SMALL,
                       batch_size=8)
    return out, summary


def test_writes_every_section(first_run: tuple[Path, dict[str, Any]], model_copy: Path) -> None:
    out, summary = first_run
    res = json.loads((out / "eval.json").read_text())
    for key in ("perplexity", "tasks", "calibration", "ood", "robustness", "attack",
                "membership", "moe", "model", "data", "settings", "timing_s", "summary",
                "contamination", "quantization", "backend"):
        assert key in res, key
    assert res["backend"]["kind"] == "model" and res["attack"]["method"] == "gradient"
    assert {"mahalanobis", "knn"} <= set(res["ood"]["char-noise"]["scores"])
    assert set(res["tasks"]) == {"next-line", "next-words"}
    assert set(res["ood"]) == {"shuffled-tokens", "char-noise"}
    assert res["membership"]["n_members"] == 10 and res["membership"]["n_nonmembers"] == 16
    layers = res["moe"]["id"]["layers"]
    assert len(layers) == 2 and len(layers[0]["tokens_per_expert"]) == 4
    assert res["moe"]["id_vs_ood"]["char-noise"]["layers"][0]["load_js_divergence"] >= 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "Reliability" in html
    assert summary["report"] == str(out / "report.html")
    meta = json.loads((model_copy / "trustmoe.json").read_text())
    assert meta["training"] == {"steps": 0}  # other keys kept
    assert meta["calibration"]["temperature"] == pytest.approx(summary["temperature"], abs=1e-3)
    assert "NaN" not in (out / "eval.json").read_text()


def test_rerun_with_other_batch_size_same_numbers_and_compare(
    first_run: tuple[Path, dict[str, Any]], model_copy: Path, data_dir: Path, tmp_path: Path
) -> None:
    out1, _ = first_run
    run_eval(model_copy, data_dir, tmp_path / "e2", backend="model", progress=False, sizes=SMALL,
             batch_size=3, compare=out1, store_temperature=False)
    a, b = _numbers(out1), _numbers(tmp_path / "e2")
    assert set(a) == set(b)
    for k in a:
        if k.startswith(("timing_s", "settings.batch_size")):
            continue
        assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-5), k
    html = (tmp_path / "e2" / "report.html").read_text()
    assert "Comparison with" in html and "perplexity.perplexity" in html
    rows = compare_rows(json.loads((tmp_path / "e2" / "eval.json").read_text()),
                        json.loads((out1 / "eval.json").read_text()))
    row = next(r for r in rows if r[0] == "perplexity.bits_per_byte")
    assert abs(float(row[3])) < 1e-5


def test_bad_inputs(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    bad_task = tmp_path / "t.jsonl"
    bad_task.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "gold": 5}) + "\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (dict(model_dir=tmp_path, data_dir=data_dir), "config"),
        (dict(model_dir=model_dir, data_dir=tmp_path / "nodata"), "not found"),
        (dict(model_dir=model_dir, data_dir=data_dir, task_files=[bad_task]), "gold"),
        (dict(model_dir=model_dir, data_dir=data_dir, ood_sets=[empty]), "empty"),
        (dict(model_dir=model_dir, data_dir=data_dir, compare=tmp_path), "eval.json"),
    ]
    for kw, msg in cases:
        with pytest.raises(TrustmoeError, match=msg):
            run_eval(out_dir=tmp_path / "out", progress=False, sizes=SMALL, **kw)  # type: ignore[arg-type]
    with pytest.raises(TrustmoeError, match="input directory"):
        run_eval(model_dir, data_dir, model_dir, progress=False, sizes=SMALL)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(TrustmoeError, match="refusing"):
        run_eval(model_dir, data_dir, tmp_path / "foreign", progress=False, sizes=SMALL)
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "x"
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "t.jsonl"
    bad.write_text('{"context": "a"}\n')
    cmd = [sys.executable, "-m", "trustmoe.cli", "eval", str(model_dir), "--data",
           str(data_dir), "--out", str(tmp_path / "o"), "--tasks", str(bad)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "missing field(s) choices, gold" in p.stderr and "Traceback" not in p.stderr
    for extra, msg in ((["--backend", "model", "--quantize", "int8"], "--backend engine"),
                       (["--backend", "tpu"], "--backend must be"),
                       (["--model-url", "http://127.0.0.1:9/v1"], "--tokenizer")):
        cmd = [sys.executable, "-m", "trustmoe.cli", "eval", str(model_dir), "--data",
               str(data_dir), "--out", str(tmp_path / "o"), *extra]
        if extra[0] == "--model-url":
            cmd.remove(str(model_dir))
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    from trustmoe.cli import app

    r = CliRunner().invoke(app, ["eval", "--help"])
    assert r.exit_code == 0 and "--ood" in r.output and "--compare" in r.output
    for flag in ("--backend", "--quantize", "--model-url", "--tokenizer", "--top-logprobs"):
        assert flag in r.output, flag


def test_dense_model_has_no_routing_section(tmp_path: Path, data_dir: Path) -> None:
    import torch

    from trustmoe.config import get_preset
    from trustmoe.model.hf import save_model
    from trustmoe.model.transformer import Transformer

    torch.manual_seed(0)
    save_model(Transformer(get_preset("tiny-dense").model), tmp_path / "dense",
               tokenizer_file=data_dir / "tokenizer.json")
    run_eval(tmp_path / "dense", data_dir, tmp_path / "ev", backend="model", progress=False,
             sizes=SMALL, store_temperature=False)
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["moe"]["id"] == {} and res["moe"]["id_vs_ood"]["char-noise"] == {}
    assert "calibration" not in json.loads((tmp_path / "dense" / "trustmoe.json").read_text())
    assert (tmp_path / "ev" / "report.html").read_text().count("data:image/png") == 4


@pytest.mark.slow
def test_cli_quick_json(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from trustmoe.cli import app

    ood = tmp_path / "code.txt"
    ood.write_text("def f(x):\n    return x + 1\n\nfor i in range(10):\n    print(i)\n")
    r = CliRunner().invoke(app, ["eval", str(model_dir), "--data", str(data_dir), "--out",
                                 str(tmp_path / "ev"), "--quick", "--json", "--ood", str(ood),
                                 "--no-store-temperature"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert set(summary["ood_best_auroc"]) == {"shuffled-tokens", "char-noise", "ood:code"}
    assert (tmp_path / "ev" / "report.html").exists()


def test_small_corpus_reports_intervals(tmp_path: Path) -> None:
    """Ten short documents: data build holds two out (not zero), eval runs on them and
    reports bootstrap 95% intervals in eval.json and report.html instead of refusing."""
    import random

    import torch

    from trustmoe.config import get_preset
    from trustmoe.data.build import BuildOptions, build_dataset
    from trustmoe.model.hf import save_model
    from trustmoe.model.transformer import Transformer

    words = "the a river stone bird flew over quiet valley morning light green hill".split()
    src = tmp_path / "docs"
    src.mkdir()
    rng = random.Random(0)
    for i in range(10):
        lines = [" ".join(rng.choice(words) for _ in range(8)).capitalize() + "."
                 for _ in range(6)]
        (src / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    build_dataset([str(src)], data, BuildOptions(vocab_size=300, license="CC0-1.0"),
                  progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokens"]["documents"] == {"train": 8, "val": 2}
    from trustmoe.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(data).get_vocab_size()
    torch.manual_seed(0)
    cfg = get_preset("tiny").model.replace(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    save_model(Transformer(cfg), tmp_path / "model", tokenizer_file=data / "tokenizer.json")
    summary = run_eval(tmp_path / "model", data, tmp_path / "ev", quick=True, progress=False)
    out = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert out["data"]["val_documents"] == 2 and summary["backend"] == "engine"
    s = out["summary"]
    for name in ("perplexity", "ece", "accuracy", "ood_auroc"):
        lo, hi = s[f"{name}_ci95_low"], s[f"{name}_ci95_high"]
        assert lo is not None and lo - 1e-12 <= s[name] <= hi + 1e-12, name
    assert s["perplexity_ci95_high"] > s["perplexity_ci95_low"]  # two documents do differ
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "perplexity (95% CI)" in html and "acc 95% CI" in html
