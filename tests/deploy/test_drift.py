"""The calibration holds empirically: on streams without drift, the mean run length between false
alarms is the configured ERT (at least 0.9x, and not wildly conservative either)."""

from __future__ import annotations

import pytest
from drift_synth import Stream, synthetic_profile

from trustmoe.deploy.drift import DETECTORS, DetectorSpec, DriftSuite
from trustmoe.eval.profile import Profile


@pytest.fixture(scope="module")
def prof() -> Profile:
    return synthetic_profile(600)


def _observed_ert(suite: DriftSuite, windows: int, seed: int) -> dict[str, float]:
    """Requests per alarm on a no-drift stream, alarms as the monitor makes them (k in a row)."""
    stream = Stream(seed)
    streak = dict.fromkeys(suite.detectors, 0)
    alarms = dict.fromkeys(suite.detectors, 0)
    for _ in range(windows):
        for r in suite.evaluate(stream.take(suite.window)):
            streak[r.detector] = streak[r.detector] + 1 if r.crossed else 0
            if streak[r.detector] >= suite.consecutive[r.detector]:
                alarms[r.detector] += 1
                streak[r.detector] = 0
    return {k: windows * suite.window / max(a, 1) for k, a in alarms.items()}


@pytest.mark.parametrize(("ert", "k", "windows"), [(100, 1, 4000), (300, 2, 3000)])
def test_mean_run_length_matches_configured_ert(prof: Profile, ert: int, k: int, windows: int) -> None:
    specs = {d: DetectorSpec(floor=0.0, consecutive=k) for d in DETECTORS}  # the statistic alone
    suite = DriftSuite(prof, window=5, ert_requests=ert, specs=specs, seed=3)
    assert set(suite.detectors) == set(DETECTORS)
    observed = _observed_ert(suite, windows, seed=99)
    for name, got in observed.items():
        # at least 0.9x; the cautious end of 8 re-samplings of the reference makes it err long
        assert 0.9 * ert <= got <= 2.5 * ert, (name, got, ert)


def test_suite_checks_shapes_and_explains_everything(prof: Profile) -> None:
    suite = DriftSuite(prof, window=20, ert_requests=2000, specs={"hidden": DetectorSpec(enabled=False)})
    text = suite.explain()
    assert set(text) == set(DETECTORS)
    assert text["hidden"].startswith("Off: disabled")
    assert "one false alarm every 2,000 requests" in text["tokens"]
    f = Stream(1).one()
    suite.check(f)
    f.hidden = f.hidden[:3]
    with pytest.raises(ValueError, match="hidden size"):
        suite.check(f)
    with pytest.raises(ValueError, match="unknown detector"):
        DriftSuite(prof, window=20, ert_requests=2000, specs={"vibes": DetectorSpec()})


def test_dense_model_profile_has_no_routing_detector() -> None:
    from dataclasses import replace

    from drift_synth import V

    from trustmoe.eval.profile import build_profile

    feats = [replace(f, routing=None) for f in Stream(4).take(60)]
    suite = DriftSuite(build_profile(feats, V, {}), window=10, ert_requests=1000)
    assert "routing" not in suite.detectors
    assert suite.explain()["routing"] == "Off: the profile's model is dense: there is no routing to watch."
    assert [r.detector for r in suite.evaluate([replace(f, routing=None) for f in Stream(5).take(10)])] == [
        "tokens", "scalars", "hidden"]
    with pytest.raises(ValueError, match="at least 20"):
        DriftSuite(build_profile(feats[:10], V, {}), window=5, ert_requests=1000)
