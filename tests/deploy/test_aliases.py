"""Moving aliases: gated promotion, rollback as a stack, history in time, search by alias."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from registry_helpers import make_eval, make_model, open_policy

from trustmoe.deploy.aliases import GateRefusal, check_gates, find_policy_file
from trustmoe.deploy.db import RegistryError
from trustmoe.deploy.records import NotFoundError
from trustmoe.deploy.registry import Registry

OPEN = open_policy()


def test_alias_history_in_time_and_search(reg: Registry, tmp_path: Path) -> None:
    for i in range(1, 4):
        reg.add(make_model(tmp_path / f"m{i}", seed=i), "demo")
    reg.add(make_model(tmp_path / "o", seed=9), "other")
    reg.promote("demo", 1, "production", why="v1", policy=OPEN)
    t1 = datetime.now(timezone.utc)
    time.sleep(0.01)
    reg.promote("demo", 2, "production", why="v2", policy=OPEN)
    t2 = datetime.now(timezone.utc)
    time.sleep(0.01)
    reg.promote("demo", 3, "canary", policy=OPEN)
    reg.promote("other", 1, "production", policy=OPEN)
    assert reg.alias_holder("demo", "production", t1).version == 1  # type: ignore[union-attr]
    assert reg.alias_holder("demo", "production", t2).version == 2  # type: ignore[union-attr]
    assert reg.alias_holder("demo", "production", t1 - timedelta(days=1)) is None
    assert reg.get("demo@production", t1).version == 1
    assert reg.get("demo").version == 3  # a bare name: the newest version
    assert reg.find_alias("production") == [("demo", 2), ("other", 1)]
    assert reg.find_alias("production", t1) == [("demo", 1)]
    assert reg.get("demo@2").aliases == ("production",)
    assert {m.name: m.aliases for m in reg.models()} == {
        "demo": {"canary": 3, "production": 2}, "other": {"production": 1}}
    with pytest.raises(NotFoundError, match="points at no version"):
        reg.get("demo@production", t1 - timedelta(days=1))


def test_rollback_steps_back_through_holders(reg: Registry, tmp_path: Path) -> None:
    for i in range(1, 4):
        reg.add(make_model(tmp_path / f"m{i}", seed=i), "demo", eval_dir=make_eval(
            tmp_path / f"e{i}", perplexity=10.0 - i))
        reg.promote("demo", i, "production")
    assert reg.rollback("demo", "production", "bad").event.version == 2
    assert reg.rollback("demo", "production").event.version == 1
    with pytest.raises(RegistryError, match="no earlier holder"):
        reg.rollback("demo", "production")
    hist = reg.history("demo", "production")
    assert [(e.seq, e.action, e.version, e.previous_version) for e in hist] == [
        (1, "promote", 1, None), (2, "promote", 2, 1), (3, "promote", 3, 2),
        (4, "rollback", 2, 3), (5, "rollback", 1, 2)]
    assert hist[3].why == "bad" and hist[3].gates["rolled_back_from"] == 3
    same = reg.promote("demo", 1, "production", policy=OPEN)
    assert not same.changed and same.event.seq == 5  # already there: nothing appended


def test_force_needs_why_and_is_recorded_with_every_failed_gate(reg: Registry, tmp_path: Path
                                                               ) -> None:
    for i, ppl in ((1, 10.0), (2, 12.0)):
        m = make_model(tmp_path / f"m{i}", seed=i)
        reg.add(m, "demo", eval_dir=make_eval(tmp_path / f"e{i}", model=m, perplexity=ppl,
                                              ece=0.05 * i))
    reg.promote("demo", 1, "production")
    with pytest.raises(GateRefusal) as refused:
        reg.promote("demo", 2, "production", why="try")
    assert [r.name for r in refused.value.report.failed] == ["perplexity"]
    assert "perplexity: 12 > 1.02 x holder v1 (10) = 10.2" in str(refused.value)
    with pytest.raises(RegistryError, match="--force needs --why"):
        reg.promote("demo", 2, "production", force=True)
    assert [e.seq for e in reg.history("demo")] == [1]  # refusals wrote nothing
    res = reg.promote("demo", 2, "production", force=True, why="customer hotfix", by="ann@ops")
    ev = res.event
    assert ev.forced and ev.by == "ann@ops" and ev.why == "customer hotfix"
    assert ev.gates["overridden"] is True
    failed = [r for r in ev.gates["report"]["results"] if r["status"] == "fail"]
    assert [(r["value"], r["holder_value"]) for r in failed] == [(12.0, 10.0)]
    # a dry run (check_gates) reads the same evidence and writes nothing
    rep = check_gates(reg, "demo", 1, "production")
    assert rep.holder_version == 2 and rep.passed
    assert len(reg.history("demo")) == 2


def test_gates_file_resolution(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                               ) -> None:
    monkeypatch.delenv("TRUSTMOE_GATES", raising=False)
    assert find_policy_file("sqlite:///" + str(tmp_path / "r.db")) is None
    (tmp_path / "gates.toml").write_text("[gates.ece]\nmax = 0.01\n")
    assert find_policy_file("sqlite:///" + str(tmp_path / "r.db")) == tmp_path / "gates.toml"
    monkeypatch.setenv("TRUSTMOE_GATES", str(tmp_path / "other.toml"))
    assert find_policy_file("sqlite:///" + str(tmp_path / "r.db")) == tmp_path / "other.toml"
    reg.add(make_model(tmp_path / "m"), "demo")
    with pytest.raises(RegistryError, match="gates file not found"):
        reg.promote("demo", 1, "production")
    assert reg.history("demo") == []
