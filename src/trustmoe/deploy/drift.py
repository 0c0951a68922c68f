"""The drift detectors of one model version, built from its profile and calibrated together.

    suite = DriftSuite(profile, window=100, ert_requests=10_000, consecutive={"tokens": 2, ...})
    results = suite.evaluate(window_of_features)      # one WindowResult per detector
    suite.explain()                                    # {"tokens": "Token distribution ...", ...}

The profile's requests are split at random into two halves: detectors fit their reference on
one and simulate reference-like windows from the other, so a simulated window is as
independent of the reference as live traffic is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trustmoe.deploy.detectors import Detector, HiddenMMD, RoutingJS, ScalarKS, TokenPSI, WindowResult
from trustmoe.engine.features import RequestFeatures
from trustmoe.eval.profile import Profile

DETECTORS = ("tokens", "scalars", "hidden", "routing")
DEFAULT_FLOORS = {"tokens": 0.1, "scalars": 0.1, "hidden": 0.0, "routing": 0.05}
MIN_PROFILE_REQUESTS = 20


@dataclass
class DetectorSpec:
    """How one detector is set up (from monitor.toml's [detectors.NAME])."""

    enabled: bool = True
    floor: float | None = None  # None -> DEFAULT_FLOORS
    consecutive: int = 1  # windows in a row that make an alarm (calibration accounts for it)
    options: dict[str, Any] = field(default_factory=dict)  # bins / features / permutations


def split_reference(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit half, simulation pool half) of n profile requests."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


class DriftSuite:
    def __init__(self, profile: Profile, *, window: int, ert_requests: float,
                 specs: Mapping[str, DetectorSpec] | None = None, seed: int = 0,
                 max_sims: int = 40000, outer: int = 8) -> None:
        if profile.n_requests < MIN_PROFILE_REQUESTS:
            raise ValueError(f"the profile holds {profile.n_requests} requests; drift detection needs at "
                             f"least {MIN_PROFILE_REQUESTS} (more make thresholds steadier)")
        specs = dict(specs or {})
        unknown = set(specs) - set(DETECTORS)
        if unknown:
            raise ValueError(f"unknown detector(s) {sorted(unknown)}; known: {list(DETECTORS)}")
        self.profile = profile
        self.window = window
        self.ert_requests = ert_requests
        ref, pool = split_reference(profile.n_requests, seed)
        self.detectors: dict[str, Detector] = {}
        self.skipped: dict[str, str] = {}
        self.consecutive: dict[str, int] = {}
        rng = np.random.default_rng(seed + 1)
        for name in DETECTORS:
            spec = specs.get(name, DetectorSpec())
            if not spec.enabled:
                self.skipped[name] = "disabled in the policy"
                continue
            floor = DEFAULT_FLOORS[name] if spec.floor is None else spec.floor
            try:
                det = _build(name, profile, ref, pool, floor, spec.options, seed)
            except ValueError as e:
                self.skipped[name] = str(e)
                continue
            det.calibrate(window, ert_requests, spec.consecutive, rng, max_sims, outer)
            self.detectors[name] = det
            self.consecutive[name] = spec.consecutive

    def check(self, f: RequestFeatures) -> None:
        """ValueError when features do not come from the profile's model shape."""
        f.check(self.profile.hidden_size, self.profile.routing_shape)
        if f.token_ids.size and int(f.token_ids.max()) >= self.profile.vocab_size:
            raise ValueError(f"token id {int(f.token_ids.max())} is outside the profile's vocabulary "
                             f"of {self.profile.vocab_size}")

    def evaluate(self, feats: Sequence[RequestFeatures]) -> list[WindowResult]:
        return [d.evaluate(feats) for d in self.detectors.values()]

    def explain(self) -> dict[str, str]:
        out = {k: d.explain() for k, d in self.detectors.items()}
        out.update({k: f"Off: {why}." for k, why in self.skipped.items()})
        return out


def _build(name: str, profile: Profile, ref: np.ndarray, pool: np.ndarray, floor: float,
           opts: dict[str, Any], seed: int) -> Detector:
    if name == "tokens":
        return TokenPSI(profile, ref, pool, floor, bins=int(opts.get("bins", 20)))
    if name == "scalars":
        feats = opts.get("features")
        return ScalarKS(profile, ref, pool, floor, **({"features": tuple(feats)} if feats else {}))
    if name == "hidden":
        return HiddenMMD(profile, ref, pool, floor, permutations=int(opts.get("permutations", 200)), seed=seed)
    return RoutingJS(profile, ref, pool, floor)
