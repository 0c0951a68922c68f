"""Drift detectors on windows of requests, each compared with a reference profile.

Every detector has one statistic computed the same way on a live window and on simulated
reference windows (`window_statistic` / `pool_statistics` share the maths), an *effect size*
people can read, a floor on that effect (a window whose effect is below the floor never
alarms, however significant), and `explain()` in plain words.

- `TokenPSI` ("tokens"): population stability index of the prompt tokens over ~20 groups of
  tokens of equal reference mass, plus one group for tokens the reference never used.
  Effect = PSI (rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift).
- `ScalarKS` ("scalars"): two-sample Kolmogorov-Smirnov tests on prompt length, mean NLL,
  mean entropy and mean top-1 probability, Bonferroni-corrected. Effect = KS distance D.
- `HiddenMMD` ("hidden"): unbiased MMD² with a Gaussian kernel (median bandwidth) between
  the window's and the reference's mean-pooled hidden states; a permutation test gives the
  p-value reported with an alarm. Effect = MMD² (0 = same, 2 = disjoint).
- `RoutingJS` ("routing"): per MoE layer, Jensen-Shannon divergence between the window's and
  the reference's expert load; the worst layer counts. Effect = total variation (the share of
  expert assignments that moved). Routing collapse onto few experts shows here first.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trustmoe.deploy.calibrate import Calibration, calibrate
from trustmoe.engine.features import RequestFeatures
from trustmoe.eval.profile import SCALARS, Profile

EPS = 1e-4  # floor on proportions in PSI and JS


@dataclass
class WindowResult:
    detector: str
    statistic: float
    threshold: float
    direction: str  # "above" | "below": which side of the threshold alarms
    effect: float
    floor: float
    crossed: bool  # beyond the threshold AND effect >= floor
    summary: str  # this window in one plain sentence
    details: dict[str, Any] = field(default_factory=dict)


class Detector(ABC):
    name = ""
    title = ""
    statistic_name = ""
    effect_name = ""
    direction = "above"

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.calibration: Calibration | None = None
        self.pool_size = 0

    @abstractmethod
    def window_statistic(self, feats: Sequence[RequestFeatures]) -> tuple[float, float, dict[str, Any]]:
        """(statistic, effect, details) of one live window."""

    @abstractmethod
    def pool_statistics(self, idx: np.ndarray) -> np.ndarray:
        """Statistics of simulated windows: idx (B, W) indexes reference pool requests -> (B,)."""

    def calibrate(self, window: int, ert_requests: float, consecutive: int, rng: np.random.Generator,
                  max_sims: int = 40000, outer: int = 8) -> Calibration:
        self.calibration = calibrate(self.pool_statistics, self.pool_size, window=window,
                                     ert_requests=ert_requests, consecutive=consecutive,
                                     direction=self.direction, rng=rng, max_sims=max_sims, outer=outer)
        return self.calibration

    def evaluate(self, feats: Sequence[RequestFeatures]) -> WindowResult:
        if self.calibration is None:
            raise RuntimeError(f"detector {self.name} used before calibrate()")
        stat, effect, details = self.window_statistic(feats)
        c = self.calibration
        crossed = c.crossed(stat) and effect >= self.floor
        return WindowResult(self.name, stat, c.threshold, c.direction, effect, self.floor, crossed,
                            self.describe(stat, effect, details), details)

    def describe(self, stat: float, effect: float, details: dict[str, Any]) -> str:
        c = self.calibration
        assert c is not None
        side = "above" if c.direction == "above" else "below"
        verdict = "beyond" if c.crossed(stat) else "within"
        small = " but the effect is below the floor" if c.crossed(stat) and effect < self.floor else ""
        return (f"{self.statistic_name} {stat:.4g} is {verdict} the threshold ({side} {c.threshold:.4g} "
                f"alarms); {self.effect_name} {effect:.4g}{small}")

    def explain(self) -> str:
        c = self.calibration
        if c is None:
            return f"{self.title}: not calibrated."
        side = "above" if c.direction == "above" else "below"
        effect = "" if self.effect_name == self.statistic_name else f"its {self.effect_name} is "
        return (f"{self.title}. A window of {c.window} requests counts when its {self.statistic_name} "
                f"is {side} {c.threshold:.4g} (the calibrated threshold) and {effect}at least "
                f"{self.floor:g} (the effect-size floor). {c.in_words()} {self.floor_words()}")

    def floor_words(self) -> str:
        return (f"The floor ({self.floor:g}) keeps differences too small to matter from alarming; "
                "it only makes false alarms rarer.")


def _psi(a_counts: np.ndarray, e_prop: np.ndarray) -> np.ndarray:
    # a_counts: (..., G) window counts; e_prop: (G,) reference proportions -> (...)
    a = a_counts / np.maximum(a_counts.sum(-1, keepdims=True), 1)
    a, e = np.maximum(a, EPS), np.maximum(e_prop, EPS)
    return ((a - e) * np.log(a / e)).sum(-1)


class TokenPSI(Detector):
    name, title = "tokens", "Token distribution (PSI)"
    statistic_name = effect_name = "token PSI"

    def __init__(self, profile: Profile, ref: np.ndarray, pool: np.ndarray, floor: float = 0.1,
                 bins: int = 20) -> None:
        super().__init__(floor)
        V = profile.vocab_size
        counts = np.zeros(V, dtype=np.int64)
        for i in ref:
            counts += np.bincount(profile.prompt(int(i)), minlength=V)
        self.ref_counts = counts
        order = np.argsort(-counts, kind="stable")
        total = max(int(counts.sum()), 1)
        before = (np.cumsum(counts[order]) - counts[order]) / total  # mass of more frequent tokens
        self.group = np.full(V, bins, dtype=np.int64)  # token -> group; `bins` = unseen
        seen = counts[order] > 0
        self.group[order[seen]] = np.minimum((before[seen] * bins).astype(np.int64), bins - 1)
        self.G = bins + 1
        self.ref_prop = np.bincount(self.group, weights=counts, minlength=self.G) / total  # (G,)
        self.pool_groups = np.stack([self._groups(profile.prompt(int(i))) for i in pool])  # (P, G)
        self.pool_size = len(pool)

    def _groups(self, ids: np.ndarray) -> np.ndarray:
        return np.bincount(self.group[ids], minlength=self.G)

    def window_statistic(self, feats: Sequence[RequestFeatures]) -> tuple[float, float, dict[str, Any]]:
        ids = np.concatenate([f.token_ids for f in feats])
        g = self._groups(ids)
        psi = float(_psi(g, self.ref_prop))
        share = np.bincount(ids, minlength=len(self.ref_counts)) / max(len(ids), 1)
        ref_share = self.ref_counts / max(int(self.ref_counts.sum()), 1)
        top = np.argsort(-(share - ref_share))[:5]
        band = "major shift" if psi > 0.25 else "moderate shift" if psi > 0.1 else "stable"
        return psi, psi, {
            "band": band, "tokens": len(ids),
            "unseen_share": float(g[-1] / max(len(ids), 1)),
            "over_represented": [{"token": int(t), "share": round(float(share[t]), 5),
                                  "reference_share": round(float(ref_share[t]), 5)} for t in top],
        }

    def pool_statistics(self, idx: np.ndarray) -> np.ndarray:
        return _psi(self.pool_groups[idx].sum(1), self.ref_prop)

    def floor_words(self) -> str:
        return (f"PSI under 0.1 is conventionally read as stable, 0.1-0.25 as a moderate and over 0.25 "
                f"as a major shift; windows under the floor ({self.floor:g}) never alarm.")


def ks_distance(ref_sorted: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample KS distance of each row of x (B, W; NaN = missing) to a sorted reference (m,).

    Returns (D, n) per row: D = sup |F_x - F_ref|, n = finite values in the row. Exact with ties.
    """
    xs = np.sort(x, axis=1)  # NaN last
    n = np.isfinite(xs).sum(1)  # (B,)
    m = len(ref_sorted)
    i = np.arange(1, xs.shape[1] + 1)[None, :]  # (1, W)
    ok = i <= n[:, None]
    nn = np.maximum(n, 1)[:, None]
    right = np.searchsorted(ref_sorted, np.where(ok, xs, 0.0), side="right") / m
    left = np.searchsorted(ref_sorted, np.where(ok, xs, 0.0), side="left") / m
    d_plus = np.where(ok, i / nn - right, -np.inf).max(1)
    d_minus = np.where(ok, left - (i - 1) / nn, -np.inf).max(1)
    return np.maximum(np.maximum(d_plus, d_minus), 0.0), n


def ks_pvalue(d: np.ndarray, n: np.ndarray, m: np.ndarray | int) -> np.ndarray:
    """Asymptotic two-sample KS p-value: Kolmogorov's distribution at sqrt(n m / (n + m)) D.

    (scipy's kstwobign; a C ufunc, so calibration can afford thousands of windows. Thresholds are
    simulated anyway, so the p-value only has to rank windows and combine features.)
    """
    from scipy.special import kolmogorov

    en = n * m / np.maximum(n + m, 1)
    p = np.ones(np.shape(d), dtype=np.float64)
    ok = n >= 1
    p[ok] = np.clip(kolmogorov(np.sqrt(en[ok]) * d[ok]), 0.0, 1.0)
    return p


class ScalarKS(Detector):
    name, title = "scalars", "Per-request scalars (KS, Bonferroni)"
    statistic_name, effect_name = "Bonferroni-corrected KS p-value", "largest KS distance"
    direction = "below"

    def __init__(self, profile: Profile, ref: np.ndarray, pool: np.ndarray, floor: float = 0.1,
                 features: Sequence[str] = SCALARS) -> None:
        super().__init__(floor)
        bad = [f for f in features if f not in SCALARS]
        if bad or not features:
            raise ValueError(f"unknown scalar feature(s) {bad}; choose from {list(SCALARS)}")
        self.features = tuple(features)
        vals = profile.scalars()
        self.ref = {f: np.sort(vals[f][ref][np.isfinite(vals[f][ref])]) for f in self.features}
        self.features = tuple(f for f in self.features if len(self.ref[f]) >= 2)
        if not self.features:
            raise ValueError("the reference has too few finite values for any scalar feature")
        self.pool = {f: vals[f][pool] for f in self.features}
        self.pool_size = len(pool)

    def _combine(self, x: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        ds, ns, ms = [], [], []
        for f in self.features:
            d, n = ks_distance(self.ref[f], x[f])
            ds.append(d)
            ns.append(n)
            ms.append(np.full_like(n, len(self.ref[f])))
        P = ks_pvalue(np.stack(ds), np.stack(ns), np.stack(ms))  # (F, B), one scipy call
        worst = P.argmin(0)  # (B,)
        p_bonf = np.minimum(1.0, len(self.features) * P.min(0))
        eff = np.stack(ds)[worst, np.arange(P.shape[1])]
        return p_bonf, eff, worst, ds

    @staticmethod
    def _value(f: RequestFeatures, name: str) -> float:
        return float(f.prompt_tokens) if name == "prompt_tokens" else float(getattr(f, name))

    def window_statistic(self, feats: Sequence[RequestFeatures]) -> tuple[float, float, dict[str, Any]]:
        x = {f: np.array([[self._value(r, f) for r in feats]]) for f in self.features}
        p, eff, worst, ds = self._combine(x)
        per = {}
        for j, f in enumerate(self.features):
            v = x[f][0][np.isfinite(x[f][0])]
            per[f] = {"ks_distance": round(float(ds[j][0]), 5),
                      "window_median": float(np.median(v)) if v.size else None,
                      "reference_median": float(np.median(self.ref[f]))}
        return float(p[0]), float(eff[0]), {"worst_feature": self.features[int(worst[0])], "features": per}

    def pool_statistics(self, idx: np.ndarray) -> np.ndarray:
        return self._combine({f: self.pool[f][idx] for f in self.features})[0]

    def floor_words(self) -> str:
        return (f"The KS distance is the largest gap between the window's and the reference's "
                f"cumulative distributions: {self.floor:g} means at least {self.floor:.0%} of requests "
                "would have to move past some value; smaller gaps never alarm.")


class HiddenMMD(Detector):
    name, title = "hidden", "Hidden states (MMD)"
    statistic_name = effect_name = "MMD²"

    def __init__(self, profile: Profile, ref: np.ndarray, pool: np.ndarray, floor: float = 0.0,
                 max_ref: int = 512, permutations: int = 200, seed: int = 0) -> None:
        super().__init__(floor)
        rng = np.random.default_rng(seed)
        ref = ref if len(ref) <= max_ref else rng.choice(ref, max_ref, replace=False)
        self.Y = profile.hidden[ref].astype(np.float64)  # (R, d)
        d2 = _sqdist(self.Y, self.Y)
        off = d2[~np.eye(len(self.Y), dtype=bool)]
        self.gamma = 1.0 / max(float(np.median(off)), 1e-12)  # k = exp(-gamma |x - y|^2)
        Kyy = np.exp(-self.gamma * d2)
        R = len(self.Y)
        self.yy = float((Kyy.sum() - np.trace(Kyy)) / max(R * (R - 1), 1))
        self.P = profile.hidden[pool].astype(np.float64)  # (P, d)
        self.Kpp = np.exp(-self.gamma * _sqdist(self.P, self.P))  # (P, P)
        self.kpy = np.exp(-self.gamma * _sqdist(self.P, self.Y)).mean(1)  # (P,)
        self.pool_size = len(pool)
        self.permutations = permutations
        self.rng = rng

    def mmd2(self, X: np.ndarray) -> float:
        # X: (W, d) -> unbiased MMD² against the reference sample; pairs of identical requests
        # (a repeated prompt) are left out of the within-window term, as in the simulation
        d2 = _sqdist(X, X)
        Kxx = np.exp(-self.gamma * d2)
        distinct = np.any(X[:, None, :] != X[None, :, :], axis=-1)  # (W, W), False on the diagonal
        xx = (Kxx * distinct).sum() / max(int(distinct.sum()), 1)
        xy = np.exp(-self.gamma * _sqdist(X, self.Y)).mean()
        return float(xx + self.yy - 2 * xy)

    def window_statistic(self, feats: Sequence[RequestFeatures]) -> tuple[float, float, dict[str, Any]]:
        X = np.stack([f.hidden for f in feats]).astype(np.float64)
        m = self.mmd2(X)
        return m, m, {"bandwidth_sq": 1.0 / self.gamma, "reference_size": len(self.Y)}

    def pool_statistics(self, idx: np.ndarray) -> np.ndarray:
        # distinct pool items only in the within-window term (re-drawn duplicates would bias it)
        K = self.Kpp[idx[:, :, None], idx[:, None, :]]  # (B, W, W)
        distinct = idx[:, :, None] != idx[:, None, :]
        xx = (K * distinct).sum((1, 2)) / np.maximum(distinct.sum((1, 2)), 1)
        return xx + self.yy - 2 * self.kpy[idx].mean(1)

    def permutation_pvalue(self, feats: Sequence[RequestFeatures], n_perm: int | None = None) -> float:
        """Share of random splits of window + reference with an MMD² at least the observed one."""
        X = np.stack([f.hidden for f in feats]).astype(np.float64)
        Z = np.concatenate([X, self.Y])
        K = np.exp(-self.gamma * _sqdist(Z, Z))
        np.fill_diagonal(K, 0.0)
        W, N = len(X), len(Z)

        def stat(mask: np.ndarray) -> float:
            a, b = mask, ~mask
            xx = K[np.ix_(a, a)].sum() / (W * (W - 1))
            yy = K[np.ix_(b, b)].sum() / ((N - W) * (N - W - 1))
            return float(xx + yy - 2 * K[np.ix_(a, b)].mean())

        first = np.zeros(N, dtype=bool)
        first[:W] = True
        obs = stat(first)
        n = n_perm or self.permutations
        hits = sum(stat(self.rng.permutation(first)) >= obs for _ in range(n))
        return (1 + hits) / (1 + n)

    def floor_words(self) -> str:
        return (f"MMD² compares whole clouds of hidden states: 0 means the same distribution, 2 "
                f"completely separate; windows under the floor ({self.floor:g}) never alarm. An alarm "
                "also reports a permutation-test p-value of the window against the reference sample.")


def _sqdist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    # A: (n, d), B: (m, d) -> (n, m) squared Euclidean distances
    d2 = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2 * A @ B.T
    return np.maximum(d2, 0.0)


def _js_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    # p, q: (..., E) distributions -> (...) Jensen-Shannon divergence in bits
    p, q = np.maximum(p, EPS), np.maximum(q, EPS)
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    m = (p + q) / 2
    return 0.5 * (p * np.log2(p / m)).sum(-1) + 0.5 * (q * np.log2(q / m)).sum(-1)


class RoutingJS(Detector):
    name, title = "routing", "Expert routing (Jensen-Shannon)"
    statistic_name, effect_name = "worst-layer routing JS divergence (bits)", "share of expert assignments moved"

    def __init__(self, profile: Profile, ref: np.ndarray, pool: np.ndarray, floor: float = 0.05) -> None:
        super().__init__(floor)
        if profile.routing is None:
            raise ValueError("the profile's model is dense: there is no routing to watch")
        load = profile.routing[ref].sum(0).astype(np.float64)  # (L, E)
        self.ref_load = load / np.maximum(load.sum(-1, keepdims=True), 1)
        self.pool = profile.routing[pool].astype(np.float64)  # (P, L, E)
        self.pool_size = len(pool)

    def _stats(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # counts: (B, L, E) -> JS (B, L), TV (B, L)
        q = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
        return _js_bits(q, self.ref_load), 0.5 * np.abs(q - self.ref_load).sum(-1)

    def window_statistic(self, feats: Sequence[RequestFeatures]) -> tuple[float, float, dict[str, Any]]:
        from scipy.special import chdtrc

        counts = np.sum([f.routing for f in feats if f.routing is not None], axis=0).astype(np.float64)  # (L, E)
        js, tv = self._stats(counts[None])
        worst = int(js[0].argmax())
        E = counts.shape[-1]
        q = counts / np.maximum(counts.sum(-1, keepdims=True), 1)  # (L, E)
        expect = np.maximum(self.ref_load, EPS) * counts.sum(-1, keepdims=True)  # (L, E)
        chi = ((counts - expect) ** 2 / np.maximum(expect, 1e-12)).sum(-1)  # (L,)
        chi_p = chdtrc(E - 1, chi)
        qlogq = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
        ent = -qlogq.sum(-1) / math.log(E)
        layers = [{"layer": li, "js_bits": round(float(js[0, li]), 6), "moved": round(float(tv[0, li]), 5),
                   "load_entropy": round(float(ent[li]), 5), "top_expert_share": round(float(q[li].max()), 5),
                   "reference_top_share": round(float(self.ref_load[li].max()), 5),
                   "dead_experts": int((counts[li] == 0).sum()), "chi2": round(float(chi[li]), 3),
                   "chi2_p_iid": float(chi_p[li])} for li in range(counts.shape[0])]
        return float(js[0, worst]), float(tv[0, worst]), {"worst_layer": worst, "layers": layers}

    def pool_statistics(self, idx: np.ndarray) -> np.ndarray:
        js, _ = self._stats(self.pool[idx].sum(1))
        return js.max(-1)

    def floor_words(self) -> str:
        return (f"The effect is the share of expert assignments in the worst layer that went to other "
                f"experts than the reference would send them to; under {self.floor:.0%} never alarms. The "
                "chi-square p-value in the details assumes independent tokens, which they are not, so "
                "the threshold comes from simulation instead.")
