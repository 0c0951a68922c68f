"""OOD metrics follow OpenOOD's conventions; membership scores match their definitions."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from trustmoe.eval import membership as mia
from trustmoe.eval import ood
from trustmoe.eval.loglik import loglik
from trustmoe.io import TrustmoeError


def test_ood_metrics_conventions() -> None:
    rng = np.random.default_rng(0)
    id_s = rng.normal(1.0, 1.0, 500)
    ood_s = rng.normal(-0.5, 1.0, 400)
    m = ood.ood_metrics(id_s, ood_s)
    y = np.r_[np.ones(500), np.zeros(400)]
    s = np.r_[id_s, ood_s]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=0.01)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=0.01)
    # FPR@95TPR: the threshold keeping 95% of ID, the share of OOD above it
    thr = np.sort(id_s)[::-1][math.ceil(0.95 * 500) - 1]
    assert m["fpr_at_95tpr"] == pytest.approx(float((ood_s >= thr).mean()), abs=1e-9)
    perfect = ood.ood_metrics(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95tpr"] == 0.0
    with pytest.raises(TrustmoeError):
        ood.ood_metrics(np.array([1.0]), np.array([]))


def test_feature_scores() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, (200, 8))
    fm = ood.FeatureModel.fit(train, k=5)
    near, far = rng.normal(0, 1, (50, 8)), rng.normal(4, 1, (50, 8))
    assert fm.mahalanobis(far).mean() > fm.mahalanobis(near).mean()
    # kNN: k-th smallest unit-sphere distance, checked by brute force for one query
    q = far[:1] / np.linalg.norm(far[:1])
    bank = train / np.linalg.norm(train, axis=1, keepdims=True)
    brute = np.sort(np.linalg.norm(bank - q, axis=1))[4]
    assert fm.knn(far[:1])[0] == pytest.approx(brute, abs=1e-6)
    with pytest.raises(TrustmoeError):
        ood.FeatureModel.fit(train[:1])


def test_sequence_scores_and_shifts(tiny_model) -> None:  # type: ignore[no-untyped-def]
    docs = [list(range(5, 40)), list(range(50, 70))]
    scored = loglik(tiny_model, docs, return_hidden=True)
    fm = ood.FeatureModel.fit(np.stack([s.hidden for s in scored] * 3) +
                              np.random.default_rng(0).normal(0, 1e-3, (6, 64)))
    sc = ood.sequence_scores(scored, fm)
    assert set(sc) == set(ood.SCORE_NAMES)
    assert sc["neg_mean_nll"][0] == pytest.approx(scored[0].logprobs.mean())
    assert sc["energy"][1] == pytest.approx(scored[1].lse.mean())
    sh = ood.shuffle_tokens(docs, 0)
    assert sorted(sh[0]) == docs[0] and sh[0] != docs[0]
    noisy = ood.char_noise(["hello world " * 10], 0)[0]
    assert len(noisy) == 120 and noisy != "hello world " * 10


def test_min_k_plus_matches_definition(tiny_model) -> None:  # type: ignore[no-untyped-def]
    ids = list(range(3, 60))
    s = loglik(tiny_model, [ids], return_logits=True)[0]
    assert s.logits is not None
    logp = s.logits.double().log_softmax(-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * logp * logp).sum(-1) - mu * mu).sqrt()
    tok = logp.gather(1, torch.from_numpy(s.targets)[:, None]).squeeze(1)
    ref = ((tok - mu) / sigma).numpy()
    np.testing.assert_allclose(mia.min_k_plus_tokens(s), ref, atol=1e-4)
    text = "some text"
    d = mia.document_scores([s], [text], k=0.2)
    n = math.ceil(56 * 0.2)
    assert d["min_k"][0] == pytest.approx(np.sort(s.logprobs)[:n].mean())
    assert d["min_k_plus"][0] == pytest.approx(np.sort(ref)[:n].mean(), abs=1e-4)
    assert d["zlib"][0] == pytest.approx(s.logprobs.sum() / len(zlib.compress(text.encode())))
    assert d["loss"][0] == pytest.approx(s.logprobs.mean())


def test_membership_metrics() -> None:
    rng = np.random.default_rng(2)
    members = {a: rng.normal(1, 1, 300) for a in mia.ATTACKS}
    non = {a: rng.normal(0, 1, 300) for a in mia.ATTACKS}
    res = mia.membership_metrics(members, non)
    for a in mia.ATTACKS:
        y = np.r_[np.ones(300), np.zeros(300)]
        assert res["attacks"][a]["auroc"] == pytest.approx(
            roc_auc_score(y, np.r_[members[a], non[a]]))
        # TPR at 1% FPR: 3 of 300 non-members may pass, so members above the 4th highest
        thr = np.sort(non[a])[::-1][3]
        assert res["attacks"][a]["tpr_at_1fpr"] == pytest.approx((members[a] > thr).mean())
    with pytest.raises(TrustmoeError):
        mia.document_scores([], [], k=0)
