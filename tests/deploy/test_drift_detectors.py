"""Each detector's maths against a reference implementation or the definition; live and simulated
windows give the same statistic; each detector sees the drift it is built for."""

from __future__ import annotations

import numpy as np
import pytest
from drift_synth import Stream, synthetic_profile
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp, kstwobign

from trustmoe.deploy.detectors import (
    HiddenMMD,
    RoutingJS,
    ScalarKS,
    TokenPSI,
    _js_bits,
    _psi,
    ks_distance,
    ks_pvalue,
)
from trustmoe.deploy.drift import split_reference
from trustmoe.eval.profile import Profile


@pytest.fixture(scope="module")
def prof() -> Profile:
    return synthetic_profile(400)


@pytest.fixture(scope="module")
def halves(prof: Profile) -> tuple[np.ndarray, np.ndarray]:
    return split_reference(prof.n_requests, 0)


def test_ks_matches_scipy_with_ties_and_missing_values() -> None:
    rng = np.random.default_rng(0)
    ref = np.sort(rng.integers(0, 12, 300).astype(float))  # many ties
    rows = [rng.integers(0, 15, 40).astype(float) for _ in range(5)]
    rows[1][:7] = np.nan  # NaN = no scored position
    d, n = ks_distance(ref, np.stack(rows))
    p = ks_pvalue(d, n, len(ref))
    for i, r in enumerate(rows):
        r = r[np.isfinite(r)]
        want = ks_2samp(r, ref, method="asymp")
        assert n[i] == len(r)
        assert d[i] == pytest.approx(want.statistic, abs=1e-12)
        en = len(r) * len(ref) / (len(r) + len(ref))
        assert p[i] == pytest.approx(kstwobign.sf(np.sqrt(en) * want.statistic), rel=1e-9)


def test_psi_and_js_from_their_definitions() -> None:
    a, e = np.array([30, 50, 20]), np.array([0.2, 0.5, 0.3])
    q = a / a.sum()
    assert _psi(a, e) == pytest.approx(sum((q - e) * np.log(q / e)))
    p2, q2 = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    assert _js_bits(p2, q2) == pytest.approx(jensenshannon(p2, q2, base=2) ** 2, rel=1e-6)


def test_mmd_from_its_definition(prof: Profile, halves: tuple[np.ndarray, np.ndarray]) -> None:
    det = HiddenMMD(prof, *halves, max_ref=64)
    X = Stream(7, shift=0.5).take(12)
    Xh = np.stack([f.hidden for f in X]).astype(np.float64)
    Y = det.Y

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-det.gamma * ((a - b) ** 2).sum()))

    W, R = len(Xh), len(Y)
    xx = sum(k(Xh[i], Xh[j]) for i in range(W) for j in range(W) if i != j) / (W * (W - 1))
    yy = sum(k(Y[i], Y[j]) for i in range(R) for j in range(R) if i != j) / (R * (R - 1))
    xy = sum(k(a, b) for a in Xh for b in Y) / (W * R)
    assert det.window_statistic(X)[0] == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


@pytest.mark.parametrize("kind", ["tokens", "scalars", "hidden", "routing"])
def test_live_and_simulated_windows_share_the_statistic(
        kind: str, prof: Profile, halves: tuple[np.ndarray, np.ndarray]) -> None:
    ref, pool = halves
    det = {"tokens": TokenPSI, "scalars": ScalarKS, "hidden": HiddenMMD, "routing": RoutingJS}[kind](
        prof, ref, pool)
    idx = np.random.default_rng(3).choice(len(pool), size=(4, 15), replace=False)
    sim = det.pool_statistics(idx)
    for b in range(4):
        live = det.window_statistic([prof.request(int(pool[i])) for i in idx[b]])[0]
        assert live == pytest.approx(sim[b], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("kind", "stream"), [
    ("tokens", Stream(11, shift=0.3)), ("scalars", Stream(12, length_scale=3.0)),
    ("hidden", Stream(13, shift=0.8)), ("routing", Stream(14, routing_shift=0.3)),
])
def test_each_detector_sees_its_drift(kind: str, stream: Stream, prof: Profile,
                                      halves: tuple[np.ndarray, np.ndarray]) -> None:
    det = {"tokens": TokenPSI, "scalars": ScalarKS, "hidden": HiddenMMD, "routing": RoutingJS}[kind](
        prof, *halves)
    det.calibrate(window=30, ert_requests=3000, consecutive=1, rng=np.random.default_rng(0))
    same = [det.evaluate(Stream(20 + i).take(30)).crossed for i in range(5)]
    moved = [det.evaluate(stream.take(30)) for _ in range(5)]
    assert sum(same) <= 1
    assert all(r.crossed for r in moved), [r.summary for r in moved]
    assert moved[0].effect >= det.floor
    text = det.explain()
    assert "every 3,000 requests" in text and "1 in 100 windows" in text


def test_effect_floor_blocks_tiny_but_significant_shifts(prof: Profile,
                                                         halves: tuple[np.ndarray, np.ndarray]) -> None:
    det = TokenPSI(prof, *halves, floor=5.0)  # an absurd floor: nothing passes it
    det.calibrate(window=30, ert_requests=3000, consecutive=1, rng=np.random.default_rng(0))
    r = det.evaluate(Stream(11, shift=0.3).take(30))
    assert r.statistic > r.threshold and not r.crossed
    assert "below the floor" in r.summary


def test_permutation_test_separates_shifted_from_same(prof: Profile,
                                                      halves: tuple[np.ndarray, np.ndarray]) -> None:
    det = HiddenMMD(prof, *halves, permutations=100)
    assert det.permutation_pvalue(Stream(15, shift=1.0).take(30)) < 0.02
    assert det.permutation_pvalue(Stream(16).take(30)) > 0.05


def test_routing_collapse_is_described(prof: Profile, halves: tuple[np.ndarray, np.ndarray]) -> None:
    det = RoutingJS(prof, *halves)
    feats = Stream(17).take(20)
    for f in feats:  # every token to expert 0 in layer 1
        assert f.routing is not None
        f.routing[1] = [f.routing[1].sum(), 0, 0, 0]
    _stat, effect, details = det.window_statistic(feats)
    assert details["worst_layer"] == 1
    layer = details["layers"][1]
    assert layer["top_expert_share"] == 1.0 and layer["dead_experts"] == 3 and layer["load_entropy"] == 0.0
    assert effect == pytest.approx(0.75, abs=0.05)
