"""Statistics shared by the audits: bootstrap 95% intervals, AUROC, TPR at a fixed FPR.

Every figure in `security.json` is `{"value": v, "ci95": [lo, hi], "n": n}`: the point
estimate on the full sample and the 2.5/97.5 percentiles of the statistic over `n_boot`
bootstrap resamples (each group resampled with replacement, independently, from a seeded
generator, so a rerun gives the same interval).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

N_BOOT = 200


def figure(value: float, lo: float, hi: float, n: int) -> dict[str, Any]:
    def clean(x: float) -> float | None:
        return round(float(x), 6) if math.isfinite(float(x)) else None

    return {"value": clean(value), "ci95": [clean(lo), clean(hi)], "n": int(n)}


def bootstrap(stat: Callable[..., float], groups: Sequence[np.ndarray], n_boot: int = N_BOOT,
              seed: int = 0) -> dict[str, Any]:
    """`stat(*groups)` with a bootstrap 95% interval; `n` is the size of the first group."""
    groups = [np.asarray(g) for g in groups]
    value = float(stat(*groups))
    if any(len(g) == 0 for g in groups):
        return figure(value, float("nan"), float("nan"), len(groups[0]))
    rng = np.random.default_rng([seed, 0xB007])
    reps = []
    for _ in range(n_boot):
        reps.append(float(stat(*(g[rng.integers(0, len(g), len(g))] for g in groups))))
    arr = np.asarray(reps)
    arr = arr[np.isfinite(arr)]
    if not len(arr):
        return figure(value, float("nan"), float("nan"), len(groups[0]))
    lo, hi = np.percentile(arr, [2.5, 97.5])
    return figure(value, float(lo), float(hi), len(groups[0]))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve, positives scoring higher (Mann-Whitney U, ties count half)."""
    from scipy.stats import rankdata

    if not len(pos) or not len(neg):
        return float("nan")
    r = rankdata(np.concatenate([pos, neg]))
    u = r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """Largest TPR at a threshold whose FPR is at most `fpr` (positives score higher).

    With n negatives the smallest FPR that can be resolved is 1/n; below it this is the TPR at
    zero false positives (a threshold above every negative)."""
    if not len(pos) or not len(neg):
        return float("nan")
    neg_sorted = np.sort(neg)[::-1]
    allowed = math.floor(fpr * len(neg) + 1e-9)  # false positives allowed
    thr = neg_sorted[allowed] if allowed < len(neg) else -np.inf  # must score above this
    return float(np.mean(pos > thr))


def attack_figures(member: np.ndarray, nonmember: np.ndarray, seed: int = 0,
                   n_boot: int = N_BOOT) -> dict[str, Any]:
    """AUROC and TPR at 0.1% and 1% FPR of one membership score, each with its interval."""
    out: dict[str, Any] = {
        "auroc": bootstrap(auroc, [member, nonmember], n_boot, seed),
        "tpr_at_0.1pct_fpr": bootstrap(lambda p, n: tpr_at_fpr(p, n, 0.001),
                                       [member, nonmember], n_boot, seed),
        "tpr_at_1pct_fpr": bootstrap(lambda p, n: tpr_at_fpr(p, n, 0.01),
                                     [member, nonmember], n_boot, seed),
    }
    out["min_resolvable_fpr"] = round(1.0 / max(len(nonmember), 1), 6)
    return out


def mean_figure(x: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> dict[str, Any]:
    return bootstrap(lambda a: float(np.mean(a)) if len(a) else float("nan"), [x], n_boot, seed)
