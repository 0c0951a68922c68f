"""Privacy audits: statistics against scikit-learn/scipy, exposure (exact vs Secret Sharer's
extrapolation), greedy extraction against the model's own decoder, membership attacks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import skewnorm
from sklearn.metrics import roc_auc_score

import trustmoe
from trustmoe.data.canaries import load
from trustmoe.data.tokenizer import load_tokenizer
from trustmoe.eval.membership import tpr_at_fpr as sk_tpr_at_fpr
from trustmoe.security import privacy as pv
from trustmoe.security.privacy_stats import auroc, bootstrap, tpr_at_fpr


def test_auroc_and_tpr_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        pos, neg = rng.normal(0.5, 1, 300), rng.normal(0, 1, 400)
        pos[:10] = neg[:10]  # ties
        y = np.r_[np.ones(300), np.zeros(400)]
        assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, np.r_[pos, neg]), abs=1e-12)
        for f in (0.001, 0.01, 0.1):
            assert tpr_at_fpr(pos, neg, f) == pytest.approx(sk_tpr_at_fpr(pos, neg, f), abs=1e-12)


def test_bootstrap_interval_covers_and_is_seeded() -> None:
    x = np.random.default_rng(1).normal(3.0, 1.0, 400)
    fig = bootstrap(lambda a: float(np.mean(a)), [x], seed=3)
    lo, hi = fig["ci95"]
    assert lo < fig["value"] < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)
    assert bootstrap(lambda a: float(np.mean(a)), [x], seed=3) == fig


def test_skewnorm_moments_recover_parameters() -> None:
    x = skewnorm.rvs(4.0, loc=30, scale=5, size=200_000, random_state=0)
    a, loc, scale = pv.skewnorm_moments(x)
    assert loc == pytest.approx(30, abs=0.3) and scale == pytest.approx(5, rel=0.05)
    assert a == pytest.approx(4.0, rel=0.25)


def test_exposure_estimators_on_a_known_distribution() -> None:
    cands = skewnorm.rvs(-3.0, loc=40, scale=6, size=5000, random_state=1)
    for q in (0.3, 0.01, 1e-3):
        px = float(skewnorm.ppf(q, -3.0, loc=40, scale=6))
        ext, sampled = pv.exposure_from_sample(px, cands, 30.0)
        assert ext == pytest.approx(-math.log2(q), abs=0.4)
        assert sampled == pytest.approx(-math.log2(q), abs=0.5 if q >= 0.01 else 1.5)
    ext, sampled = pv.exposure_from_sample(0.0, cands, 30.0)  # far below every candidate
    assert ext == 30.0 and sampled == pytest.approx(math.log2(5000))  # capped; sampled saturates
    assert pv.exact_exposure(1.0, np.array([1.0, 2, 3, 4])) == 2.0  # rank 1 of 4


def test_edit_similarity() -> None:
    assert pv.edit_similarity([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert pv.edit_similarity([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert pv.edit_similarity([1, 2, 3, 4], [2, 3, 4]) == 0.75


def test_greedy_continue_equals_the_models_argmax(audit_world: dict[str, Path]) -> None:
    """The engine's greedy decode (what the scan extracts with) is the torch model's argmax."""
    model = trustmoe.load(audit_world["model"]).eval()
    prefixes = [[0, 5, 9, 17, 30], [0, 44, 2, 8, 3, 12, 7]]
    got = pv.greedy_continue(model, prefixes, 12)
    for p, g in zip(prefixes, got, strict=True):
        x = torch.tensor([p])  # (1, T)
        with torch.no_grad():
            for _ in range(12):
                x = torch.cat([x, model.run(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert g == x[0, len(p):].tolist()


def test_canary_exposure_exact_vs_extrapolated(audit_world: dict[str, Path]) -> None:
    model = trustmoe.load(audit_world["model"])
    tok = load_tokenizer(audit_world["data"])
    canaries = load(audit_world["data"])
    exact = pv.canary_exposure(model, tok, canaries)  # |R| = 1000: enumerated
    est = pv.canary_exposure(model, tok, canaries, pv.ExposureOptions(
        n_candidates=400, enumerate_limit=0))
    assert [r["method"] for r in exact] == ["exact"] * 2 and est[0]["method"] == "skew-normal"
    for a, b in zip(exact, est, strict=True):
        assert a["log_perplexity"] == pytest.approx(b["log_perplexity"], abs=1e-6)
        assert b["exposure_sampled"] == pytest.approx(a["exposure"], abs=1.2)
        if a["exposure"] < 8:  # the sampled share is resolvable; the fit tracks it
            assert b["exposure"] == pytest.approx(a["exposure"], abs=1.5)
    by = pv.exposure_by_repeats(exact)
    assert by["40"]["exposure"]["value"] > by["1"]["exposure"]["value"] + 2  # memorised more


def test_membership_attacks_find_members(audit_world: dict[str, Path]) -> None:
    from trustmoe.eval import loglik
    from trustmoe.security.scan_inputs import load_inputs

    inp = load_inputs(audit_world["model"], audit_world["data"], 60, 64, 0)
    m = loglik(inp.model, inp.train_chunks)
    n = loglik(inp.model, inp.val_chunks)
    res = pv.membership(m, [inp.tokenizer.decode(c) for c in inp.train_chunks], n,
                        [inp.tokenizer.decode(c) for c in inp.val_chunks], m, n)
    assert set(res["attacks"]) == {"loss", "zlib", "min_k", "min_k_plus", "reference"}
    ref = res["attacks"]["reference"]["auroc"]
    assert ref["value"] == pytest.approx(0.5)  # the target as its own reference: no signal
    for a in res["attacks"].values():
        assert a["auroc"]["ci95"][0] <= a["auroc"]["value"] <= a["auroc"]["ci95"][1]
