"""The monitor: windows per version, consecutive windows, cooldown, SLOs, incidents with their
chain back to the data, the sink's store/act calls and the status the dashboard reads."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from drift_synth import Stream, synthetic_profile

from trustmoe.deploy.drift import DETECTORS, DetectorSpec
from trustmoe.deploy.incidents import ActionResult, Incident, hash_request_id
from trustmoe.deploy.monitor import Monitor, RequestRecord, VersionInfo
from trustmoe.deploy.policy import Policy, SLOPolicy
from trustmoe.eval.profile import Profile

PROF: Profile = synthetic_profile(400)
PROF.ref = "evals/demo-2#sha256:" + "ef" * 32
INFO = VersionInfo("demo:2", digest="ab" * 32, dataset_manifest_sha256="cd" * 32, role="canary")


class RecordingSink:
    def __init__(self, fail: bool = False) -> None:
        self.stored: list[tuple[str, str | None]] = []
        self.acted: list[Incident] = []
        self.fail = fail

    def store(self, incident: Incident) -> None:
        self.stored.append((incident.id, incident.action_result))

    def act(self, incident: Incident) -> ActionResult:
        if self.fail:
            raise RuntimeError("registry is locked")
        self.acted.append(incident)
        return ActionResult(True, f"canary {incident.version} set to 0%")


def _policy(**kw: object) -> Policy:
    base = Policy(window=10, ert_requests=2000, consecutive=2, cooldown_requests=60, cooldown_s=0,
                  act=("hidden", "tokens"), action="rollback_canary", sample_requests=3,
                  slo=SLOPolicy(window=20, max_error_rate=None),
                  detectors={d: DetectorSpec(consecutive=2) for d in DETECTORS})
    return replace(base, **kw)  # type: ignore[arg-type]


def _feed(mon: Monitor, stream: Stream, n: int, start: int = 0, **rec: object) -> list[Incident]:
    out = []
    for i, f in enumerate(stream.take(n)):
        out += mon.observe(RequestRecord(f"req-{start + i}", "demo:2", float(start + i), features=f,
                                         prompt=f"prompt {start + i}", **rec))  # type: ignore[arg-type]
    return out


def test_drift_opens_one_incident_per_detector_then_cools_down() -> None:
    sink = RecordingSink()
    mon = Monitor(_policy(), sink=sink, clock=lambda: 1000.0)
    mon.add_version(replace(INFO), PROF)
    assert _feed(mon, Stream(5), 100) == []  # no drift
    opened = _feed(mon, Stream(6, shift=0.6), 60, start=100)
    by = {i.detector: i for i in opened}
    assert "tokens" in by and "hidden" in by
    inc = by["tokens"]
    assert inc.window["last_request"] in (120, 130)  # two consecutive drifted windows
    assert inc.statistic > inc.threshold and inc.effect >= inc.floor and inc.consecutive == 2
    assert (inc.version, inc.digest, inc.dataset_manifest_sha256) == ("demo:2", "ab" * 32, "cd" * 32)
    assert inc.profile_ref == PROF.ref
    last = inc.window["last_request"]
    window_ids = {hash_request_id(f"req-{i}") for i in range(last - 10, last)}
    assert len(inc.sample_request_ids) == 3 and set(inc.sample_request_ids) <= window_ids
    assert not any(s.startswith("req-") for s in inc.sample_request_ids) and inc.prompts is None
    assert "one false alarm every 2,000 requests" in inc.explanation and "This window:" in inc.explanation
    assert inc.action == "rollback_canary" and inc.action_result == "canary demo:2 set to 0%"
    assert sorted(i.detector for i in sink.acted) == sorted(d for d in by if d in ("hidden", "tokens"))
    assert all(by[d].action == "notify" and by[d].action_result == "notify only" for d in by
               if d not in ("hidden", "tokens"))
    assert [s for s in sink.stored if s[0] == inc.id] == [(inc.id, None), (inc.id, inc.action_result)]
    assert "permutation_p" in by["hidden"].details
    # drift goes on: the next incident of a detector comes only after its cooldown (60 requests)
    more = [i for i in opened + _feed(mon, Stream(7, shift=0.6), 140, start=160) if i.detector == "tokens"]
    ends = [i.window["last_request"] for i in more]
    assert len(ends) >= 2 and all(b - a > 60 for a, b in itertools.pairwise(ends))
    hist = mon.status()["versions"]["demo:2"]["detectors"]["tokens"]["history"]
    assert any(h["crossed"] and h["quiet"] for h in hist)  # crossed, but quiet: recorded, no incident


def test_one_drifted_window_is_not_enough_with_two_required() -> None:
    mon = Monitor(_policy())
    mon.add_version(replace(INFO), PROF)
    _feed(mon, Stream(5), 30)
    assert _feed(mon, Stream(6, shift=0.8), 10, start=30) == []
    assert _feed(mon, Stream(9), 10, start=40) == []
    st = mon.status()["versions"]["demo:2"]["detectors"]["tokens"]
    assert [h["crossed"] for h in st["history"]] == [False, False, False, True, False]


def test_log_prompts_and_a_failing_action_still_leave_a_stored_incident() -> None:
    sink = RecordingSink(fail=True)
    mon = Monitor(_policy(log_prompts=True), sink=sink)
    mon.add_version(replace(INFO), PROF)
    opened = _feed(mon, Stream(6, shift=0.8), 40)
    inc = next(i for i in opened if i.detector == "tokens")
    assert inc.prompts is not None and all(p.startswith("prompt ") for p in inc.prompts)
    assert inc.action_result is not None and inc.action_result.startswith("failed: RuntimeError: registry is locked")
    assert sink.stored[-1] == (opened[-1].id, opened[-1].action_result)


def test_slo_breach_and_inconclusive_windows() -> None:
    pol = _policy(slo=SLOPolicy(window=20, p99_latency_s=1.0, p99_ttft_s=0.2, max_error_rate=0.1),
                  act=("slo",), detectors={d: DetectorSpec(enabled=False) for d in DETECTORS})
    mon = Monitor(pol)
    mon.add_version(replace(INFO), PROF)
    s = Stream(1)
    opened = _feed(mon, s, 20, latency_s=0.5)  # fast, no TTFT reported
    assert opened == []
    slo = mon.status()["versions"]["demo:2"]["slo"]
    assert slo["inconclusive_windows"]["p99_ttft_s"] == 1 and slo["last"]["p99_latency_s"] == pytest.approx(0.5)
    opened = _feed(mon, s, 19, start=20, latency_s=3.0, ttft_s=0.1)
    opened += mon.observe(RequestRecord("boom", "demo:2", 40.0, error=True))
    assert [i.detector for i in opened] == ["slo.p99_latency_s"]
    inc = opened[0]
    assert inc.statistic == pytest.approx(3.0) and inc.threshold == 1.0 and inc.action == "rollback_canary"
    assert "99% of completed requests finish within 1s" in inc.explanation
    errs = []
    for i in range(20):
        errs += mon.observe(RequestRecord(f"e{i}", "demo:2", 50.0 + i, latency_s=0.1, error=i % 4 == 0))
    assert [i.detector for i in errs] == ["slo.max_error_rate"]
    assert errs[0].statistic == pytest.approx(0.25)
    assert set(errs[0].sample_request_ids) <= {hash_request_id(f"e{i}") for i in range(0, 20, 4)}


def test_status_is_json_and_bad_records_are_refused() -> None:
    mon = Monitor(_policy())
    mon.add_version(replace(INFO), PROF)
    _feed(mon, Stream(2), 25)
    st = mon.status()
    json.dumps(st)  # no NaN / numpy left
    v = st["versions"]["demo:2"]
    assert v["requests"] == 25 and v["windows"] == 2 and v["pending"] == 5
    assert set(v["detectors"]) >= set(DETECTORS) and "slo.max_error_rate" not in v["detectors"]
    assert set(mon.explain("demo:2")) >= set(DETECTORS)
    with pytest.raises(KeyError, match="not watched"):
        mon.observe(RequestRecord("x", "other:1", 0.0))
    f = Stream(3).one()
    f.hidden = f.hidden[:2]
    with pytest.raises(ValueError, match="hidden size"):
        mon.observe(RequestRecord("x", "demo:2", 0.0, features=f))
