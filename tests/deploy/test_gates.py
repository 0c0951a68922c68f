"""Promotion gates: the policy file, every bound, missing inputs, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trustmoe.deploy.gates import (
    DEFAULT_GATES_TOML,
    GateInput,
    GatesError,
    evaluate,
    load_policy,
    parse_policy,
)


def side(version: int, docs: dict[str, Any] | None = None, **metrics: Any) -> GateInput:
    return GateInput(version, metrics, {"quantized_perplexity_delta": "eval.json has none"},
                     lambda part: (docs or {}).get(part))


def test_default_policy_passes_a_first_good_version_and_reports_skips() -> None:
    pol = load_policy(None)
    assert pol.source == "built-in default"
    rep = evaluate(pol, "production", side(1, perplexity=10.0, ece=0.05), None)
    status = {r.name: r.status for r in rep.results}
    assert status == {"perplexity": "pass", "ece": "pass", "contamination_hits": "skip",
                      "security_max_severity": "skip", "quantized_perplexity_delta": "skip"}
    assert rep.passed and rep.holder_version is None
    assert "no current holder" in rep.results[0].rule


def test_ratio_to_holder_reports_both_values() -> None:
    pol = load_policy(None)
    rep = evaluate(pol, "production", side(3, perplexity=10.5, ece=0.2),
                   side(2, perplexity=10.0, ece=0.01))
    assert not rep.passed
    lines = [r.line() for r in rep.failed]
    assert lines == ["perplexity: 10.5 > 1.02 x holder v2 (10) = 10.2", "ece: 0.2 > 0.1"]
    ok = evaluate(pol, "production", side(3, perplexity=10.19, ece=0.1), side(2, perplexity=10.0))
    assert ok.passed


def test_every_bound_and_severity() -> None:
    pol = parse_policy("""
        [gates.perplexity]
        max = 20
        min_ratio_to_holder = 0.5
        [gates.attack_success_rate]
        max_increase_over_holder = 0.05
        [gates.membership_max_auroc]
        min = 0.4
        [gates.security_max_severity]
        max = "low"
        [gates.contamination_hits]
        max = 0
    """, "t")
    holder = side(1, perplexity=10.0, attack_success_rate=0.10, membership_max_auroc=0.5,
                  security_max_severity="none", contamination_hits=0)
    good = side(2, perplexity=6.0, attack_success_rate=0.15, membership_max_auroc=0.45,
                security_max_severity="low", contamination_hits=0)
    assert evaluate(pol, "production", good, holder).passed
    bad = side(2, perplexity=4.0, attack_success_rate=0.2, membership_max_auroc=0.3,
               security_max_severity="high", contamination_hits=3)
    lines = {r.name: r.line() for r in evaluate(pol, "production", bad, holder).failed}
    assert lines == {
        "perplexity": "perplexity: 4 < 0.5 x holder v1 (10) = 5",
        "attack_success_rate": "attack_success_rate: 0.2 > holder v1 (0.1) + 0.05 = 0.15",
        "membership_max_auroc": "membership_max_auroc: 0.3 < 0.4",
        "security_max_severity": "security_max_severity: high > low",
        "contamination_hits": "contamination_hits: 3 > 0",
    }


def test_missing_inputs_fail_with_reason_or_skip() -> None:
    pol = parse_policy('[gates.quantized_perplexity_delta]\nmax = 0.01\n', "t")
    rep = evaluate(pol, "production", side(1), None)
    assert [r.line() for r in rep.failed] == [
        "quantized_perplexity_delta: input missing (eval.json has none)"]
    pol = parse_policy('missing = "skip"\n[gates.quantized_perplexity_delta]\nmax = 0.01\n', "t")
    assert evaluate(pol, "production", side(1), None).results[0].status == "skip"
    # the holder lacks the metric: the ratio cannot be computed, and that is said
    pol = parse_policy("[gates.perplexity]\nmax_ratio_to_holder = 1.02\n", "t")
    rep = evaluate(pol, "production", side(2, perplexity=9.0), side(1))
    assert rep.failed[0].detail.startswith("holder v1:")


def test_path_gates_and_alias_scoping() -> None:
    pol = parse_policy("""
        [gates.next_words]
        source = "eval"
        path = "tasks.next-words.acc"
        min = 0.5
        aliases = ["production"]
    """, "t")
    cand = side(2, docs={"eval": {"tasks": {"next-words": {"acc": 0.4}}}})
    assert [r.line() for r in evaluate(pol, "production", cand, None).failed] == [
        "next_words: 0.4 < 0.5"]
    assert evaluate(pol, "canary", cand, None).results == ()  # not for this alias
    rep = evaluate(pol, "production", side(2, docs={"eval": {}}), None)
    assert "no number at tasks.next-words.acc" in rep.failed[0].detail


@pytest.mark.parametrize("text,needle", [
    ("[gates.ece\nmax = 1", "is not valid TOML"),
    ("[gates.ece]\nmaxx = 1", "unknown key 'maxx'"),
    ("[gates.ece]\n", "has no bound"),
    ("[gates.bogus]\nmax = 1", "unknown metric 'bogus'"),
    ("[gates.ece]\nmax = \"low\"", "must be a number"),
    ("[gates.security_max_severity]\nmax = \"dire\"", "severity"),
    ("[gates.perplexity]\nmax_ratio_to_holder = 0", "must be positive"),
    ("missing = \"maybe\"\n[gates.ece]\nmax = 1", "missing must be"),
    ("gates = 3", "defines no"),
    ("[gates.x]\nsource = \"eval\"\nmax = 1", "a path gate needs"),
    ("[gates.ece]\nmax = 1\naliases = \"production\"", "aliases must be a list"),
    ("colour = 1\n[gates.ece]\nmax = 1", "unknown top-level key"),
])
def test_malformed_policy_is_one_clear_line(text: str, needle: str) -> None:
    with pytest.raises(GatesError, match=needle) as e:
        parse_policy(text, "gates.toml")
    assert "\n" not in str(e.value).strip() and "gates.toml" in str(e.value)


def test_policy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(GatesError, match="not found"):
        load_policy(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[gates]")
    with pytest.raises(GatesError, match="not valid UTF-8"):
        load_policy(bad)
    good = tmp_path / "gates.toml"
    good.write_text(DEFAULT_GATES_TOML)
    pol = load_policy(good)
    assert pol.source == str(good) and pol.sha256 == load_policy(None).sha256
