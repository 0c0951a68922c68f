"""Thresholds from an expected run time between false alarms (ERT), by simulation on the reference.

Detectors look at tumbling windows of `window` requests. When traffic matches the reference,
windows are independent draws, so if one window crosses the threshold with probability p
and an alarm needs `k` windows in a row, the number of windows until the first alarm has
the mean of a run of k successes in Bernoulli(p) trials:

    E[windows] = (1 - p^k) / ((1 - p) p^k),    ERT (requests) = window * E[windows].

`window_alarm_probability` solves this for p. The threshold is then the (1 - p) quantile of
the detector's statistic on reference-like windows, which `calibrate` estimates by drawing
many windows of whole requests from the part of the reference the detector did not fit on
(re-sampling, so the simulated windows vary as much as fresh traffic would).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Direction = str  # "above": alarm when statistic > threshold; "below": when statistic < threshold


def expected_windows(p: float, k: int) -> float:
    """Mean number of windows until k consecutive windows cross (each with probability p)."""
    if p <= 0:
        return math.inf
    if p >= 1:
        return float(k)
    return (1 - p ** k) / ((1 - p) * p ** k)


def window_alarm_probability(ert_requests: float, window: int, consecutive: int = 1) -> float:
    """The per-window crossing probability p that gives the configured ERT."""
    if window < 1 or consecutive < 1:
        raise ValueError(f"window and consecutive must be >= 1, got {window} and {consecutive}")
    target = ert_requests / window
    if target <= consecutive:
        raise ValueError(
            f"ert_requests {ert_requests:g} is too small: with windows of {window} requests and "
            f"{consecutive} consecutive window(s) required, no alarm can come before "
            f"{window * consecutive} requests")
    lo, hi = 0.0, 1.0  # expected_windows decreases in p
    for _ in range(200):
        mid = (lo + hi) / 2
        if expected_windows(mid, consecutive) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def simulation_count(p: float, lo: int = 4000, hi: int = 40000, exceed: int = 400) -> int:
    """Windows to simulate so that about `exceed` of them cross the threshold."""
    return int(min(hi, max(lo, math.ceil(exceed / p))))


@dataclass
class Calibration:
    threshold: float
    direction: Direction
    p_window: float  # chance that one reference-like window crosses
    ert_requests: float
    window: int
    consecutive: int
    simulated: int  # windows simulated (all re-samplings of the pool together)
    exceed: int  # simulated windows beyond the threshold, per re-sampling (median)
    outer: int = 1  # re-samplings of the reference pool

    def crossed(self, statistic: float) -> bool:
        if not math.isfinite(statistic):
            return False
        return statistic > self.threshold if self.direction == "above" else statistic < self.threshold

    def in_words(self) -> str:
        one_in = 1 / self.p_window
        k = self.consecutive
        runs = f"{k} windows in a row" if k > 1 else "one window"
        rough = " (estimated from few simulated crossings; treat as approximate)" if self.exceed < 10 else ""
        margin = (f" The threshold is the cautious end of {self.outer} re-samplings of the reference, so a "
                  "small reference errs towards fewer false alarms.") if self.outer > 1 else ""
        return (f"About 1 in {one_in:,.0f} windows of reference-like traffic crosses this threshold; "
                f"an alarm needs {runs}, so with no drift there is on average one false alarm every "
                f"{self.ert_requests:,.0f} requests (the configured ERT){rough}.{margin}")


def calibrate(null_stats: Callable[[np.ndarray], np.ndarray], pool_size: int, *, window: int,
              ert_requests: float, consecutive: int = 1, direction: Direction = "above",
              rng: np.random.Generator, max_sims: int = 40000, outer: int = 8,
              confidence: float = 0.8) -> Calibration:
    """Threshold for a statistic from simulated reference windows.

    `null_stats(idx)` maps a (B, window) array of indices into the pool of reference requests
    to the B window statistics (lower-is-worse statistics such as p-values use direction "below").

    A reference of a few hundred requests pins down the tail of the statistic only roughly
    (rare kinds of requests may be missing from it), so the pool itself is re-sampled `outer`
    times, a threshold is found for each, and the `confidence` quantile of those is used: with
    a small reference, thresholds err towards fewer false alarms rather than more.
    """
    if pool_size < 1:
        raise ValueError("no reference requests to simulate windows from")
    p = window_alarm_probability(ert_requests, window, consecutive)
    per = max(simulation_count(p, hi=max_sims) // max(outer, 1), 500)
    chunk = max(1, 2_000_000 // max(window, 1) // 64)
    thresholds, exceeds = [], []
    for _ in range(max(outer, 1)):
        members = np.arange(pool_size) if outer <= 1 else rng.integers(0, pool_size, size=pool_size)
        stats = []
        for b0 in range(0, per, chunk):
            idx = members[rng.integers(0, pool_size, size=(min(chunk, per - b0), window))]
            stats.append(np.asarray(null_stats(idx), dtype=np.float64))
        s = np.concatenate(stats)
        s = np.where(np.isfinite(s), s, -np.inf if direction == "above" else np.inf)
        if direction == "above":
            thr = float(np.quantile(s, 1 - p, method="higher"))
            exceeds.append(int((s > thr).sum()))
        else:
            thr = float(np.quantile(s, p, method="lower"))
            exceeds.append(int((s < thr).sum()))
        thresholds.append(thr)
    t = np.array(thresholds)
    final = float(np.quantile(t, confidence if direction == "above" else 1 - confidence, method="nearest"))
    return Calibration(final, direction, p, ert_requests, window, consecutive, per * len(t),
                       int(np.median(exceeds)), outer)
