"""Calibration: ECE (equal-width and equal-mass), MCE, Brier, NLL, temperature scaling.

- Equal-width ECE / MCE: torchmetrics' `multiclass_calibration_error` definition: 15 bins
  `linspace(0, 1, 16)`, bin index = bucketize(conf, right=True) - 1, ECE = sum over bins of
  |acc - conf| weighted by the bin's share; MCE = max |acc - conf| over bins.
- Equal-mass ECE: HELM's `ece_10_bin` (Kumar et al.'s `get_ece_em`): 10 bins holding equal
  numbers of sorted confidences, bin edges at midpoints between neighbouring bins.
- Brier: multiclass, mean over samples of sum_v (p_v - 1[v = y])^2 (scikit-learn's).
- NLL: mean -log p(y) (scikit-learn's `log_loss`).
Temperature scaling divides logits by T fitted by minimising NLL on a held-out split.
Intervals (`ece_ci`) resample whole documents, since the tokens of one are correlated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trustmoe.io import TrustmoeError, atomic_write_json, read_json
from trustmoe.security.integrity import refresh_manifest


def _check(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if conf.shape != correct.shape or conf.ndim != 1 or conf.size == 0:
        raise TrustmoeError("calibration needs equal-length, non-empty confidence/label arrays")
    return conf, correct


def reliability_bins(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15
                     ) -> list[dict[str, float]]:
    """Equal-width bins exactly as torchmetrics forms them (conf == 1.0 gets its own slot)."""
    conf, correct = _check(conf, correct)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges, conf, side="right") - 1  # == torch.bucketize(right=True) - 1
    out = []
    for b in range(n_bins + 1):
        m = idx == b
        if not m.any():
            continue
        lo = edges[min(b, n_bins)]
        hi = edges[b + 1] if b < n_bins else 1.0
        out.append({"lo": float(lo), "hi": float(hi), "count": int(m.sum()),
                    "share": float(m.mean()), "acc": float(correct[m].mean()),
                    "conf": float(conf[m].mean())})
    return out


def ece_equal_width(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    bins = reliability_bins(conf, correct, n_bins)
    return float(sum(b["share"] * abs(b["acc"] - b["conf"]) for b in bins))


def mce(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    bins = reliability_bins(conf, correct, n_bins)
    return float(max(abs(b["acc"] - b["conf"]) for b in bins))


def equal_mass_edges(conf: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Kumar et al. `get_equal_bins`: upper edges at midpoints between equal-count groups."""
    s = np.sort(conf)
    n_bins = min(n_bins, len(s))
    groups = np.array_split(s, n_bins)
    edges = [(groups[i][-1] + groups[i + 1][0]) / 2.0 for i in range(n_bins - 1)]
    return np.array(sorted(set([*edges, 1.0])))


def ece_equal_mass(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    conf, correct = _check(conf, correct)
    edges = equal_mass_edges(conf, n_bins)
    idx = np.searchsorted(edges, conf)  # bin i holds edges[i-1] < conf <= edges[i]
    total = 0.0
    for b in np.unique(idx):
        m = idx == b
        total += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(total)


def summary(conf: np.ndarray, correct: np.ndarray, p_true: np.ndarray, sum_p2: np.ndarray
            ) -> dict[str, Any]:
    """All calibration numbers from per-sample top-1 confidence, correctness, p(y), sum p²."""
    conf, correct = _check(conf, correct)
    p_true = np.asarray(p_true, dtype=np.float64)
    brier = np.asarray(sum_p2, dtype=np.float64) - 2.0 * p_true + 1.0
    return {
        "n": int(conf.size),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(conf.mean()),
        "ece_15_equal_width": ece_equal_width(conf, correct, 15),
        "ece_10_equal_mass": ece_equal_mass(conf, correct, 10),
        "mce_15": mce(conf, correct, 15),
        "brier": float(brier.mean()),
        "nll": float(-np.log(np.clip(p_true, 1e-300, None)).mean()),
        "reliability": reliability_bins(conf, correct, 15),
    }


def from_probs(probs: list[np.ndarray], gold: list[int]) -> dict[str, Any]:
    """Calibration of multiple-choice predictions (probabilities over each item's choices)."""
    conf = np.array([p.max() for p in probs])
    correct = np.array([float(np.argmax(p) == g) for p, g in zip(probs, gold, strict=True)])
    p_true = np.array([p[g] for p, g in zip(probs, gold, strict=True)])
    sum_p2 = np.array([(p * p).sum() for p in probs])
    return summary(conf, correct, p_true, sum_p2)


def from_logits(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> dict[str, Any]:
    """Next-token calibration from (n, V) logits and (n,) targets at a temperature."""
    logp = (logits.double() / temperature).log_softmax(-1)  # (n, V)
    p = logp.exp()
    conf, pred = p.max(-1)
    p_true = p.gather(1, targets[:, None]).squeeze(1)
    return summary(conf.numpy(), (pred == targets).double().numpy(), p_true.numpy(),
                   (p * p).sum(-1).numpy())


def ece_ci(conf: np.ndarray, correct: np.ndarray, groups: np.ndarray, seed: int
           ) -> tuple[float, float]:
    """Bootstrap 95% interval of the 15-bin ECE, resampling whole groups (documents)."""
    from trustmoe.eval.bootstrap import grouped_ci

    conf, correct = _check(conf, correct)
    return grouped_ci(lambda ix: ece_equal_width(conf[ix], correct[ix], 15), groups, seed)


def confidence(logits: Tensor, targets: Tensor, temperature: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample top-1 confidence and correctness at a temperature: (n,), (n,)."""
    p = (logits.double() / temperature).softmax(-1)  # (n, V)
    conf, pred = p.max(-1)
    return conf.numpy(), (pred == targets).double().numpy()


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """argmin_T mean NLL(softmax(logits / T)) over T in [0.05, 20] (bounded Brent on log T)."""
    from scipy.optimize import minimize_scalar

    if logits.shape[0] == 0:
        raise TrustmoeError("no held-out tokens to fit a temperature on")
    z = logits.double()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), targets))

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))


def store_temperature(model_dir: Path, temperature: float, info: dict[str, Any]) -> None:
    """Read-modify-write `trustmoe.json`: set "calibration", keep every other key."""
    path = Path(model_dir) / "trustmoe.json"
    meta = read_json(path, "trustmoe.json") if path.exists() else {}
    if not isinstance(meta, dict):
        raise TrustmoeError(f"{path} is not a JSON object; refusing to overwrite it")
    meta["calibration"] = {"temperature": temperature, **info}
    atomic_write_json(path, meta)
    refresh_manifest(model_dir, [path.name])  # the model dir's manifest follows the edit
