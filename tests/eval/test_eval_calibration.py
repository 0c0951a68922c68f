"""Calibration numbers equal torchmetrics' and scikit-learn's; temperature is stored safely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from trustmoe.eval import calibration as cal
from trustmoe.io import TrustmoeError


def _random_logits(seed: int, n: int = 400, c: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2.5
    targets = torch.randint(0, c, (n,), generator=g)
    # make it better than chance so bins are not all empty
    logits[torch.arange(n)[: n // 2], targets[: n // 2]] += 3.0
    return logits, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics_and_sklearn(seed: int) -> None:
    logits, targets = _random_logits(seed)
    ours = cal.from_logits(logits, targets)
    probs = logits.softmax(-1)
    for norm, key in (("l1", "ece_15_equal_width"), ("max", "mce_15")):
        ref = multiclass_calibration_error(probs, targets, num_classes=7, n_bins=15, norm=norm)
        assert ours[key] == pytest.approx(float(ref), abs=1e-6)
    assert ours["nll"] == pytest.approx(log_loss(targets.numpy(), probs.numpy(),
                                                 labels=list(range(7))), abs=1e-9)
    onehot = np.eye(7)[targets.numpy()]
    assert ours["brier"] == pytest.approx(((probs.numpy() - onehot) ** 2).sum(1).mean(), abs=1e-9)


def test_binary_brier_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    p1 = rng.uniform(size=300)
    y = (rng.uniform(size=300) < p1).astype(int)
    probs = [np.array([1 - a, a]) for a in p1]
    ours = cal.from_probs(probs, y.tolist())
    # multiclass Brier of a 2-class problem is twice the binary Brier score
    assert ours["brier"] == pytest.approx(2 * brier_score_loss(y, p1), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=200), st.integers(0, 2**31))
def test_equal_width_property(conf: list[float], seed: int) -> None:
    c = torch.tensor(conf, dtype=torch.float64)
    correct = torch.from_numpy(np.random.default_rng(seed).integers(0, 2, len(conf)))
    from torchmetrics.functional.classification.calibration_error import _ce_compute

    ref = _ce_compute(c, correct.double(), 15, norm="l1")
    assert cal.ece_equal_width(c.numpy(), correct.numpy()) == pytest.approx(float(ref), abs=1e-9)


def test_equal_mass_by_hand() -> None:
    conf = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    correct = np.array([0, 0, 1, 0, 1, 1, 0, 1, 1, 1.0])
    # 10 bins of one sample each: ECE = mean |conf - correct|
    assert cal.ece_equal_mass(conf, correct, 10) == pytest.approx(np.abs(conf - correct).mean())
    # 2 bins of five: |mean conf - mean acc| per half
    half = 0.5 * abs(conf[:5].mean() - correct[:5].mean()) + 0.5 * abs(
        conf[5:].mean() - correct[5:].mean())
    assert cal.ece_equal_mass(conf, correct, 2) == pytest.approx(half)
    edges = cal.equal_mass_edges(conf, 2)
    np.testing.assert_allclose(edges, [0.65, 1.0])


def test_temperature_scaling_recovers_known_temperature() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4000, 10, generator=g, dtype=torch.float64) * 2
    targets = torch.multinomial(base.softmax(-1), 1, generator=g).squeeze(1)
    # the true distribution is softmax(base); logits that are 3x too sharp want T = 3
    t = cal.fit_temperature(base * 3.0, targets)
    assert t == pytest.approx(3.0, rel=0.1)
    before = cal.from_logits(base * 3.0, targets)
    after = cal.from_logits(base * 3.0, targets, t)
    assert after["nll"] < before["nll"]
    assert after["ece_15_equal_width"] < before["ece_15_equal_width"]


def test_store_temperature_keeps_other_keys(tmp_path: Path) -> None:
    meta = {"dataset_sha256": "abc", "training": {"steps": 5}}
    (tmp_path / "trustmoe.json").write_text(json.dumps(meta))
    cal.store_temperature(tmp_path, 1.7, {"ece_before": 0.2})
    out = json.loads((tmp_path / "trustmoe.json").read_text())
    assert out["dataset_sha256"] == "abc" and out["training"] == {"steps": 5}
    assert out["calibration"] == {"temperature": 1.7, "ece_before": 0.2}
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "trustmoe.json").write_text("[1, 2]")
    with pytest.raises(TrustmoeError, match="not a JSON object"):
        cal.store_temperature(tmp_path, 1.0, {})
    assert (tmp_path / "trustmoe.json").read_text() == "[1, 2]"


def test_bad_shapes() -> None:
    with pytest.raises(TrustmoeError):
        cal.ece_equal_width(np.array([0.5, 0.2]), np.array([1.0]))
    with pytest.raises(TrustmoeError):
        cal.ece_equal_mass(np.array([]), np.array([]))
