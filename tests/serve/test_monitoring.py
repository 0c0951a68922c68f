"""The server's live monitor: finished requests reach `Monitor.observe` on a background worker
(never the request path), a drifting canary opens an incident stored in the registry database
with its lineage and is rolled back to 0%, swaps re-read the fleet, a version without a
profile is served but not watched, and a full queue drops records instead of blocking."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from monitor_helpers import Finished, Served, StaticFleet, features, policy, registry_with_two, write_eval_dir

from trustmoe.deploy.incidents import IncidentStore
from trustmoe.serve.monitoring import LiveMonitor


def _traffic(fleet: StaticFleet, n: int, shift_canary: float, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        key = "demo@2" if i % 5 == 0 else "demo@1"  # 20% canary
        fleet.finish(Finished(key, f"req-{seed}-{i}", features=features(rng, shift_canary if key == "demo@2" else 0)))


def test_drifting_canary_is_rolled_back_and_the_incident_kept(tmp_path: Path) -> None:
    reg, fleet = registry_with_two(tmp_path)
    live = LiveMonitor(fleet, policy(), registry=reg).start()
    try:
        t0 = time.perf_counter()
        _traffic(fleet, 300, shift_canary=1.0)  # 60 canary requests: 3 windows of 20
        submit_s = time.perf_counter() - t0
        assert live.drain(120)
        assert submit_s < 1.0  # the request path only enqueued (calibration ran on the worker)
        assert live.counters.observed == 300 and live.counters.dropped == 0
        assert fleet.percent == 0.0  # canary rolled back
        stored = IncidentStore(reg.url).list()
        acted = [i for i in stored if i.action_result and i.action_result.startswith("canary demo@2 set to 0%")]
        assert acted, [(i.detector, i.version, i.action_result) for i in stored]
        inc = acted[0]
        assert inc.version == "demo@2" and inc.role == "canary" and inc.model == "demo"
        assert inc.digest == fleet.served[1].digest and inc.dataset_manifest_sha256 == "cd" * 32
        assert inc.profile_ref and inc.profile_ref.startswith(str(fleet.served[1].eval_dir))
        assert inc.window["last_request"] <= 2 * 20 + 20  # within the windows the policy asks
        assert not [i for i in stored if i.version == "demo@1"]  # production did not drift
        assert len(reg.history("demo", "production")) == 1  # production alias untouched
        st = live.status()
        assert st["canary_percent"] == 0.0 and st["queue"]["observed"] == 300
        assert st["aliases"]["demo"]["current"] == {"production": 1, "canary": 2}
        assert {v["key"] for v in st["served"]} == {"demo@1", "demo@2"}
        assert st["versions"]["demo@2"]["detectors"]["hidden"]["history"]
    finally:
        live.stop()
        reg.close()


def test_production_rollback_goes_through_the_registry(tmp_path: Path) -> None:
    reg, fleet = registry_with_two(tmp_path)
    reg.promote("demo", 2, "production", why="promote v2", force=True)
    fleet.served = [Served("demo@2", "demo", 2, fleet.served[1].digest, "production",
                           fleet.served[1].model_dir, fleet.served[1].eval_dir)]
    live = LiveMonitor(fleet, policy(action="rollback_production"), registry=reg).start()
    try:
        rng = np.random.default_rng(3)
        for i in range(80):
            fleet.finish(Finished("demo@2", f"p{i}", features=features(rng, 1.0)))
        assert live.drain(120)
        last = reg.history("demo", "production")[-1]
        assert last.action == "rollback" and (last.previous_version, last.version) == (2, 1)
        assert last.why.startswith("incident ") and "on demo@2" in last.why
        assert fleet.reloads == 1  # the server re-reads the registry
        kept = IncidentStore(reg.url).get(last.why.split()[1].rstrip(":"))
        assert kept.action_result == "alias demo@production rolled back v2 -> v1 (alias history #3)"
    finally:
        live.stop()
        reg.close()


def test_swaps_profiles_and_a_full_queue(tmp_path: Path) -> None:
    ev = write_eval_dir(tmp_path / "e1")
    fleet = StaticFleet([Served("a@1", "a", 1, "11" * 32, "production", tmp_path, ev),
                         Served("b@1", "b", 1, "22" * 32, "canary", tmp_path, None)])
    live = LiveMonitor(fleet, policy(), queue_max=3)
    for i in range(5):  # worker not started: the queue fills, the rest is dropped, nothing blocks
        live.submit(Finished("a@1", f"r{i}"))
    assert live.counters.dropped == 2 and live.counters.submitted == 5
    live.start()
    try:
        assert live.drain(60)
        st = live.status()
        assert "a@1" in st["versions"] and "b@1" not in st["versions"]
        assert "no eval dir" in st["queue"]["not_watched"]["b@1"]
        fleet.finish(Finished("b@1", "x"))
        fleet.served[0].role = "retired"
        fleet.swap()
        assert live.drain(60)
        assert live.counters.unwatched == 1
        assert live.monitor.watches["a@1"].info.role == "retired"
        fleet.served = fleet.served[1:]
        fleet.swap()
        assert live.drain(60)
        assert "a@1" not in live.status()["versions"]
        live.submit(object())  # a malformed record is counted, never raised
        assert live.counters.failed == 1
    finally:
        live.stop()
