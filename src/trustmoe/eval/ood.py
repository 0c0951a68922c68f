"""Out-of-distribution detection with per-sequence scores, OpenOOD conventions.

Every score is an *ID score*: higher means "more in-distribution" (OpenOOD's `conf`).
- neg_mean_nll: mean token log-probability.   - msp: mean max-softmax probability.
- max_logit: mean max logit.                  - energy: mean logsumexp of logits (= -energy).
- neg_entropy: minus mean token entropy.
- mahalanobis: minus the Mahalanobis distance of the mean-pooled final hidden state to the
  training documents' Gaussian (Ledoit-Wolf shrunk covariance, so few documents still work).
- knn: minus the distance to the k-th nearest training document in L2-normalised hidden space
  (OpenOOD's KNN postprocessor).
Metrics put ID as the positive class: AUROC, AUPR-IN (ID positive, score), AUPR-OUT (OOD
positive, -score), FPR@95TPR (share of OOD accepted at the threshold that keeps 95% of ID).
Areas under curves use trapezoids (`sklearn.metrics.auc`) as OpenOOD does.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trustmoe.eval.bootstrap import auroc_ci
from trustmoe.eval.loglik import Scored
from trustmoe.io import TrustmoeError

SCORE_NAMES = ("neg_mean_nll", "msp", "max_logit", "energy", "neg_entropy", "mahalanobis", "knn")


@dataclass
class FeatureModel:
    """Fitted on mean-pooled hidden states of training documents."""

    mean: np.ndarray  # (d,)
    precision: np.ndarray  # (d, d)
    bank: np.ndarray  # (n, d) L2-normalised training features
    k: int

    @classmethod
    def fit(cls, feats: np.ndarray, k: int = 50) -> FeatureModel:
        from sklearn.covariance import LedoitWolf

        if feats.ndim != 2 or feats.shape[0] < 2:
            raise TrustmoeError("need at least 2 training documents to fit OOD feature scores")
        lw = LedoitWolf().fit(feats)
        bank = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)
        return cls(lw.location_, lw.precision_, bank, max(1, min(k, feats.shape[0])))

    def mahalanobis(self, feats: np.ndarray) -> np.ndarray:
        d = feats - self.mean  # (m, d)
        return np.sqrt(np.einsum("md,de,me->m", d, self.precision, d).clip(0))

    def knn(self, feats: np.ndarray) -> np.ndarray:
        q = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)
        dist = np.sqrt((2 - 2 * q @ self.bank.T).clip(0))  # (m, n) unit-sphere distances
        return np.sort(dist, axis=1)[:, self.k - 1]


def sequence_scores(scored: Sequence[Scored], features: FeatureModel | None) -> dict[str, np.ndarray]:
    """(m,) ID score arrays, one per score name."""
    out = {
        "neg_mean_nll": np.array([s.logprobs.mean() for s in scored]),
        "msp": np.array([s.max_prob.mean() for s in scored]),
        "max_logit": np.array([s.max_logit.mean() for s in scored]),
        "energy": np.array([s.lse.mean() for s in scored]),
        "neg_entropy": np.array([-s.entropy.mean() for s in scored]),
    }
    if features is not None and scored and all(s.hidden is not None for s in scored):
        h = np.stack([s.hidden for s in scored])  # type: ignore[misc]
        out["mahalanobis"] = -features.mahalanobis(h)
        out["knn"] = -features.knn(h)
    # a backend without the logits' scale (an OpenAI server) leaves max_logit/energy NaN
    return {k: v for k, v in out.items() if not np.isnan(v).all()}


def ood_metrics(id_score: np.ndarray, ood_score: np.ndarray, tpr: float = 0.95) -> dict[str, Any]:
    """OpenOOD metrics with ID positive; also the ROC curve (for plotting)."""
    from sklearn import metrics

    if len(id_score) == 0 or len(ood_score) == 0:
        raise TrustmoeError("OOD metrics need at least one ID and one OOD sequence")
    conf = np.concatenate([id_score, ood_score])
    is_id = np.concatenate([np.ones(len(id_score)), np.zeros(len(ood_score))])
    fpr_l, tpr_l, _ = metrics.roc_curve(is_id, conf)
    p_in, r_in, _ = metrics.precision_recall_curve(is_id, conf)
    p_out, r_out, _ = metrics.precision_recall_curve(1 - is_id, -conf)
    return {
        "auroc": float(metrics.auc(fpr_l, tpr_l)),
        "aupr_in": float(metrics.auc(r_in, p_in)),
        "aupr_out": float(metrics.auc(r_out, p_out)),
        "fpr_at_95tpr": float(fpr_l[np.argmax(tpr_l >= tpr)]),
        "roc": {"fpr": _thin(fpr_l), "tpr": _thin(tpr_l)},
    }


def _thin(x: np.ndarray, n: int = 101) -> list[float]:
    if len(x) <= n:
        return [round(float(v), 6) for v in x]
    idx = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
    return [round(float(x[i]), 6) for i in idx]


# ---------------------------------------------------------------- built-in shifts


def shuffle_tokens(docs: Sequence[list[int]], seed: int) -> list[list[int]]:
    """Same tokens, random order: the unigram statistics stay, the language goes."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.array(d)).tolist() for d in docs]


def char_noise(texts: Sequence[str], seed: int, rate: float = 0.25) -> list[str]:
    """Replace a share of letters with random lowercase letters."""
    rng = random.Random(seed)
    out = []
    for t in texts:
        chars = list(t)
        for i, c in enumerate(chars):
            if c.isalpha() and rng.random() < rate:
                chars[i] = rng.choice(string.ascii_lowercase)
        out.append("".join(chars))
    return out


def evaluate_sets(id_scores: dict[str, np.ndarray], ood_sets: dict[str, dict[str, np.ndarray]],
                  seed: int = 0) -> dict[str, Any]:
    """Metrics for every OOD set and score; plus the best score per set by AUROC (with a
    stratified bootstrap 95% interval for that best score's AUROC)."""
    result: dict[str, Any] = {}
    for name, scores in ood_sets.items():
        per = {s: ood_metrics(id_scores[s], scores[s]) for s in SCORE_NAMES
               if s in scores and s in id_scores}
        best = max(per, key=lambda s: per[s]["auroc"])
        lo, hi = auroc_ci(id_scores[best], scores[best], seed)
        per[best]["auroc_ci95_low"], per[best]["auroc_ci95_high"] = lo, hi
        result[name] = {"n": len(next(iter(scores.values()))), "scores": per, "best": best}
    return result
