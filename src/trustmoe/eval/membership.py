"""Memorisation and contamination signals: is a document from the training set?

Per document, every score is a *member score* (higher = more likely seen in training):
- loss: minus the mean token NLL (Yeom et al.).
- zlib: minus the NLL summed over tokens divided by the zlib-compressed length in bytes
  (Carlini et al. 2021: log-perplexity against zlib entropy).
- min_k: mean of the k% lowest token log-probabilities (Shi et al. 2024, Min-K% Prob).
- min_k_plus: Min-K%++ (Zhang et al. 2024): each token's log-probability standardised by the
  mean and standard deviation of log p under the model's own next-token distribution,
  mu = E_p[log p] = -H, sigma^2 = E_p[(log p)^2] - mu^2; mean of the k% lowest.
AUROC and TPR at 1% FPR compare training documents (positive) with held-out documents of the
same corpus; the dataset's val split is a random split, so there is no time-shift bias.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from trustmoe.eval.bootstrap import auroc_ci
from trustmoe.eval.loglik import Scored
from trustmoe.io import TrustmoeError

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus")


def lowest_mean(x: np.ndarray, k: float) -> float:
    n = max(1, math.ceil(len(x) * k))
    return float(np.sort(x)[:n].mean())


def min_k_plus_tokens(s: Scored) -> np.ndarray:
    mu = -s.entropy  # (n,) E_p[log p]
    return (s.logprobs - mu) / np.sqrt(s.logp_var.clip(min=1e-12))


def document_scores(scored: Sequence[Scored], texts: Sequence[str], k: float = 0.2
                    ) -> dict[str, np.ndarray]:
    if not 0 < k <= 1:
        raise TrustmoeError(f"Min-K% fraction must be in (0, 1], got {k}")
    out: dict[str, list[float]] = {a: [] for a in ATTACKS}
    for s, t in zip(scored, texts, strict=True):
        out["loss"].append(float(s.logprobs.mean()))
        out["zlib"].append(float(s.logprobs.sum()) / len(zlib.compress(t.encode("utf-8"))))
        out["min_k"].append(lowest_mean(s.logprobs, k))
        out["min_k_plus"].append(lowest_mean(min_k_plus_tokens(s), k))
    return {a: np.array(v) for a, v in out.items()}


def tpr_at_fpr(member: np.ndarray, nonmember: np.ndarray, fpr: float = 0.01) -> float:
    """Largest TPR whose FPR is at most `fpr` on the ROC curve (members positive)."""
    from sklearn.metrics import roc_curve

    y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    f, t, _ = roc_curve(y, np.concatenate([member, nonmember]))
    ok = f <= fpr
    return float(t[ok].max()) if ok.any() else 0.0


def membership_metrics(members: dict[str, np.ndarray], nonmembers: dict[str, np.ndarray],
                       seed: int = 0) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    n_m, n_n = len(members["loss"]), len(nonmembers["loss"])
    if n_m == 0 or n_n == 0:
        raise TrustmoeError("membership inference needs training and held-out documents")
    res: dict[str, Any] = {"n_members": n_m, "n_nonmembers": n_n, "attacks": {}}
    for a in ATTACKS:
        y = np.concatenate([np.ones(n_m), np.zeros(n_n)])
        s = np.concatenate([members[a], nonmembers[a]])
        res["attacks"][a] = {
            "auroc": float(roc_auc_score(y, s)),
            **dict(zip(("auroc_ci95_low", "auroc_ci95_high"),
                       auroc_ci(members[a], nonmembers[a], seed), strict=True)),
            "tpr_at_1fpr": tpr_at_fpr(members[a], nonmembers[a], 0.01),
            "member_mean": float(members[a].mean()),
            "nonmember_mean": float(nonmembers[a].mean()),
        }
    res["max_auroc"] = max(v["auroc"] for v in res["attacks"].values())
    return res
