"""ERT -> per-window crossing probability -> threshold, checked against direct simulation."""

from __future__ import annotations

import numpy as np
import pytest

from trustmoe.deploy.calibrate import calibrate, expected_windows, window_alarm_probability


def _mean_windows_to_run(p: float, k: int, runs: int, rng: np.random.Generator) -> float:
    total = 0
    for _ in range(runs):
        n = streak = 0
        while streak < k:
            n += 1
            streak = streak + 1 if rng.random() < p else 0
        total += n
    return total / runs


@pytest.mark.parametrize(("p", "k"), [(0.2, 1), (0.3, 2), (0.5, 3)])
def test_expected_windows_matches_simulation(p: float, k: int) -> None:
    sim = _mean_windows_to_run(p, k, 20000, np.random.default_rng(0))
    assert sim == pytest.approx(expected_windows(p, k), rel=0.03)


@pytest.mark.parametrize(("ert", "window", "k"), [(10000, 100, 1), (10000, 100, 2), (500, 10, 3)])
def test_probability_inverts_ert(ert: float, window: int, k: int) -> None:
    p = window_alarm_probability(ert, window, k)
    assert 0 < p < 1
    assert window * expected_windows(p, k) == pytest.approx(ert, rel=1e-9)
    if k == 1:
        assert p == pytest.approx(window / ert)


def test_impossible_ert_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        window_alarm_probability(150, 100, 2)


def test_threshold_is_the_null_quantile() -> None:
    # a statistic that is uniform on [0, 1] under the null: threshold = 1 - p
    rng = np.random.default_rng(1)
    pool = rng.random(100_000)
    c = calibrate(lambda idx: pool[idx[:, 0]], len(pool), window=1, ert_requests=50,
                  rng=np.random.default_rng(2))
    assert c.p_window == pytest.approx(0.02)
    assert c.threshold == pytest.approx(0.98, abs=0.004)
    lo = calibrate(lambda idx: pool[idx[:, 0]], len(pool), window=1, ert_requests=50, direction="below",
                   rng=np.random.default_rng(2))
    assert lo.threshold == pytest.approx(0.02, abs=0.004)
    assert lo.crossed(0.001) and not lo.crossed(0.5) and not lo.crossed(float("nan"))
    assert "1 in 50 windows" in c.in_words() and "every 50 requests" in c.in_words()
