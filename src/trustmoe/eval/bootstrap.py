"""Bootstrap 95% confidence intervals (percentile method), so small held-out splits still report.

The sampling unit is what is independent: documents for perplexity and next-token calibration
(tokens of one document are correlated), instances for task accuracy, and sequences for
AUROC, where ID and OOD (or member and non-member) sets are resampled separately (stratified).
Every interval is seeded, so two runs give the same bounds. With a single unit there is no
spread to resample and both bounds equal the point estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

N_BOOT = 1000


def ci95(stat: Callable[[np.ndarray], float], n: int, seed: int, n_boot: int = N_BOOT
         ) -> tuple[float, float]:
    """Percentile interval of `stat(indices)` over `n_boot` resamples of range(n)."""
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng([seed, n, 95])
    vals = np.array([stat(ix) for ix in rng.integers(0, n, size=(n_boot, n))], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def mean_ci(x: np.ndarray, seed: int, n_boot: int = N_BOOT) -> tuple[float, float]:
    """Interval of the mean of x (vectorised)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng([seed, x.size, 95])
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve = P(pos score > neg score) + 0.5 P(tie) (Mann-Whitney U)."""
    from scipy.stats import rankdata

    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def auroc_ci(pos: np.ndarray, neg: np.ndarray, seed: int, n_boot: int = N_BOOT
             ) -> tuple[float, float]:
    """Stratified interval: positives and negatives resampled separately."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng([seed, len(pos), len(neg), 95])
    vals = [auroc(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg),
                                                                               len(neg))])
            for _ in range(n_boot)]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def grouped_ci(stat: Callable[[np.ndarray], float], groups: np.ndarray, seed: int,
               n_boot: int = N_BOOT) -> tuple[float, float]:
    """Interval of a per-item statistic when items come in groups (tokens of documents):
    resample whole groups, then apply `stat` to the item indices they hold."""
    groups = np.asarray(groups)
    ids, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(ids))]
    return ci95(lambda ix: stat(np.concatenate([members[g] for g in ix])), len(ids), seed, n_boot)
