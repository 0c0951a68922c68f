"""Bootstrap intervals: AUROC by definition, coverage near 95%, agreement with scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from trustmoe.eval.bootstrap import auroc, auroc_ci, ci95, grouped_ci, mean_ci


def test_auroc_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 30).astype(float)
    y = np.r_[np.ones(40), np.zeros(30)]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, np.r_[pos, neg]))


def test_mean_interval_agrees_with_scipy_percentile() -> None:
    x = np.random.default_rng(1).normal(size=200)
    lo, hi = mean_ci(x, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile",
                        random_state=0).confidence_interval
    assert abs(lo - ref.low) < 0.03 and abs(hi - ref.high) < 0.03
    assert (lo, hi) == mean_ci(x, seed=0)  # seeded: the same bounds on a rerun
    assert lo < x.mean() < hi


def test_coverage_is_near_95_percent() -> None:
    rng = np.random.default_rng(2)
    hits = 0
    trials = 300
    for t in range(trials):
        x = (rng.random(60) < 0.3).astype(float)
        lo, hi = mean_ci(x, seed=t, n_boot=400)
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / trials <= 0.99


def test_generic_grouped_and_auroc_intervals() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    lo, hi = ci95(lambda ix: float(np.median(x[ix])), len(x), seed=0)
    assert lo <= np.median(x) <= hi
    # groups: resampling whole groups is wider than pretending items are independent
    groups = np.repeat(np.arange(6), 20)
    y = np.repeat(rng.normal(size=6), 20) + 0.01 * rng.normal(size=120)
    g_lo, g_hi = grouped_ci(lambda ix: float(y[ix].mean()), groups, seed=0)
    i_lo, i_hi = mean_ci(y, seed=0)
    assert g_hi - g_lo > 2 * (i_hi - i_lo)
    assert grouped_ci(lambda ix: float(y[ix].mean()), np.zeros(5), seed=0)[0] == \
        pytest.approx(y[:5].mean())
    pos, neg = rng.normal(1, 1, 25), rng.normal(0, 1, 25)
    a_lo, a_hi = auroc_ci(pos, neg, seed=0)
    assert a_lo < auroc(pos, neg) < a_hi and a_lo >= 0 and a_hi <= 1
    assert np.isnan(mean_ci(np.empty(0), 0)[0])
