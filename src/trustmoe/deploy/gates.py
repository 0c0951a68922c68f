"""Promotion gates: a policy file (`gates.toml`) checked before an alias moves to a version.

    missing = "fail"                 # a gate whose input is missing fails (default) or "skip"s

    [gates.perplexity]               # the table name is the metric (see evidence.METRICS) ...
    max_ratio_to_holder = 1.02       # candidate <= 1.02 x the alias's current holder
    [gates.ece]
    max = 0.10
    [gates.security_max_severity]
    max = "medium"                   # none < info < low < medium < high < critical
    missing = "skip"
    [gates.next_words_acc]           # ... or any number in eval.json / security.json
    source = "eval"
    path = "tasks.next-words.acc"
    min = 0.25
    aliases = ["production"]         # only for promotions to these aliases

A `[signatures]` table (`require = true`, `keys = [...]`) makes the registry require signed
models: see `deploy/signatures.py`.

Bounds: `max`, `min` (absolute), `max_ratio_to_holder`, `min_ratio_to_holder`,
`max_increase_over_holder` (candidate - holder). A ratio or increase gate passes when the
alias has no holder yet (nothing to compare against). Every failed gate is reported with both
values; `promote --force --why` overrides and the override is written into the alias history.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trustmoe.deploy.db import RegistryError
from trustmoe.deploy.evidence import METRICS, SEVERITIES, lookup
from trustmoe.deploy.signatures import SignaturePolicy, parse_signatures

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_GATES_TOML = """\
# trustmoe's default promotion gates (used when no gates.toml is given)
missing = "fail"

[gates.perplexity]
max_ratio_to_holder = 1.02

[gates.ece]
max = 0.10

[gates.contamination_hits]
max = 0
missing = "skip"

[gates.security_max_severity]
max = "medium"
missing = "skip"

[gates.quantized_perplexity_delta]
max = 0.01
missing = "skip"
"""

BOUNDS = ("max", "min", "max_ratio_to_holder", "min_ratio_to_holder", "max_increase_over_holder")
_HOLDER_BOUNDS = BOUNDS[2:]
_KEYS = {*BOUNDS, "metric", "source", "path", "missing", "aliases"}


class GatesError(RegistryError):
    """The gates file cannot be used (one line naming the file and the problem)."""


@dataclass(frozen=True)
class Gate:
    name: str
    metric: str | None  # a known metric, or None with source/path
    source: str | None
    path: str | None
    bounds: dict[str, Any]
    missing: str  # fail | skip
    aliases: tuple[str, ...] = ()

    def applies_to(self, alias: str) -> bool:
        return not self.aliases or alias in self.aliases


@dataclass(frozen=True)
class Policy:
    gates: tuple[Gate, ...]
    source: str  # the file, or "built-in default"
    sha256: str
    signatures: SignaturePolicy = field(default_factory=SignaturePolicy)


@dataclass(frozen=True)
class GateResult:
    name: str
    status: str  # pass | fail | skip
    value: Any
    holder_value: Any
    rule: str  # e.g. "<= 1.02 x holder v2 (11.0) = 11.22"
    detail: str = ""

    def line(self) -> str:
        v = _fmt(self.value) if self.value is not None else "input missing"
        rule = f" {self.rule}" if self.rule else ""
        return f"{self.name}: {v}{rule}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class GateReport:
    alias: str
    version: int
    holder_version: int | None
    policy: str
    policy_sha256: str
    results: tuple[GateResult, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return all(r.status != "fail" for r in self.results)

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if r.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


@dataclass(frozen=True)
class GateInput:
    """What a gate can read about one version."""

    version: int
    metrics: dict[str, Any]
    missing: dict[str, str]
    doc: Callable[[str], Any]  # "eval" | "security" -> the parsed JSON (None if absent)


def parse_policy(text: str, source: str) -> Policy:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GatesError(f"gates file {source} is not valid TOML: {e}") from None
    default_missing = raw.get("missing", "fail")
    if default_missing not in ("fail", "skip"):
        raise GatesError(f"gates file {source}: missing must be \"fail\" or \"skip\", "
                         f"not {default_missing!r}")
    unknown_top = set(raw) - {"missing", "gates", "signatures"}
    if unknown_top:
        raise GatesError(f"gates file {source}: unknown top-level key {sorted(unknown_top)[0]!r} "
                         "(expected missing, [gates.NAME] tables and [signatures])")
    tables = raw.get("gates", {})
    if not isinstance(tables, dict) or (not tables and "signatures" not in raw):
        raise GatesError(f"gates file {source} defines no [gates.NAME] tables")
    gates = tuple(_parse_gate(name, t, default_missing, source) for name, t in tables.items())
    sigs = parse_signatures(raw["signatures"], source) if "signatures" in raw else SignaturePolicy()
    return Policy(gates, source, hashlib.sha256(text.encode()).hexdigest(), sigs)


def _parse_gate(name: str, t: Any, default_missing: str, source: str) -> Gate:
    where = f"gates file {source}: gate {name!r}"
    if not isinstance(t, dict):
        raise GatesError(f"{where} must be a table")
    bad = set(t) - _KEYS
    if bad:
        raise GatesError(f"{where}: unknown key {sorted(bad)[0]!r} (known: {', '.join(sorted(_KEYS))})")
    bounds = {k: t[k] for k in BOUNDS if k in t}
    if not bounds:
        raise GatesError(f"{where} has no bound (one of {', '.join(BOUNDS)})")
    src, path = t.get("source"), t.get("path")
    metric = None
    if path is not None or src is not None:
        if src not in ("eval", "security") or not isinstance(path, str) or not path:
            raise GatesError(f"{where}: a path gate needs source = \"eval\" or \"security\" and "
                             "a dotted path")
    else:
        metric = t.get("metric", name)
        if metric not in METRICS:
            raise GatesError(f"{where}: unknown metric {metric!r} (known: {', '.join(METRICS)}; "
                             "or give source and path)")
    severity = metric == "security_max_severity"
    for k, v in bounds.items():
        if severity:
            if k not in ("max", "min") or not isinstance(v, str) or v.lower() not in SEVERITIES:
                raise GatesError(f"{where}: {k} must be max/min with a severity "
                                 f"({', '.join(SEVERITIES)}), got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise GatesError(f"{where}: {k} must be a number, got {v!r}")
        elif k.endswith("ratio_to_holder") and v <= 0:
            raise GatesError(f"{where}: {k} must be positive, got {v}")
    missing = t.get("missing", default_missing)
    if missing not in ("fail", "skip"):
        raise GatesError(f"{where}: missing must be \"fail\" or \"skip\", not {missing!r}")
    aliases = t.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise GatesError(f"{where}: aliases must be a list of alias names")
    return Gate(name, metric, src, path, bounds, missing, tuple(aliases))


def load_policy(path: Path | None) -> Policy:
    """The policy in `path`, or the built-in default when None."""
    if path is None:
        return parse_policy(DEFAULT_GATES_TOML, "built-in default")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GatesError(f"gates file not found: {path}") from None
    except UnicodeDecodeError:
        raise GatesError(f"gates file {path} is not valid UTF-8") from None
    except OSError as e:
        raise GatesError(f"cannot read gates file {path}: {e.strerror}") from None
    return parse_policy(text, str(path))


def _value(g: Gate, side: GateInput) -> tuple[Any, str]:
    if g.metric is not None:
        v = side.metrics.get(g.metric)
        return v, side.missing.get(g.metric, f"{g.metric} was not recorded")
    assert g.source is not None and g.path is not None
    doc = side.doc(g.source)
    if doc is None:
        return None, f"no {g.source} file was registered with v{side.version}"
    v = lookup(doc, g.path)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None, f"{g.source} of v{side.version} has no number at {g.path}"
    return v, ""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _check(g: Gate, value: Any, holder: GateInput | None) -> GateResult:
    """Check every bound of `g`; the rule text shows the comparison made (negated if it failed)."""
    passed_rules: list[str] = []
    failed_rules: list[str] = []
    holder_value = None
    for k, bound in g.bounds.items():
        op = "<=" if k.startswith("max") else ">="
        if k in _HOLDER_BOUNDS:
            if holder is None:
                passed_rules.append(f"{k} {bound}: no current holder to compare with")
                continue
            hv, why = _value(g, holder)
            if hv is None:
                return GateResult(g.name, "skip" if g.missing == "skip" else "fail", value, None,
                                  f"{k} {bound}", f"holder v{holder.version}: {why}")
            holder_value = hv
            if k == "max_increase_over_holder":
                limit = hv + bound
                how = f"holder v{holder.version} ({_fmt(hv)}) + {_fmt(bound)} = {_fmt(limit)}"
            else:
                limit = bound * hv
                how = f"{_fmt(bound)} x holder v{holder.version} ({_fmt(hv)}) = {_fmt(limit)}"
        else:
            limit, how = bound, _fmt(bound)
        if _compare(value, op, limit):
            passed_rules.append(f"{op} {how}")
        else:
            failed_rules.append(f"{_NEGATED[op]} {how}")
    if failed_rules:
        return GateResult(g.name, "fail", value, holder_value, "; ".join(failed_rules))
    return GateResult(g.name, "pass", value, holder_value, "; ".join(passed_rules))


_NEGATED = {"<=": ">", ">=": "<"}


def _compare(value: Any, op: str, limit: Any) -> bool:
    if isinstance(value, str):
        a, b = SEVERITIES.index(value.lower()), SEVERITIES.index(str(limit).lower())
        return a <= b if op == "<=" else a >= b
    return bool(value <= limit) if op == "<=" else bool(value >= limit)


def evaluate(policy: Policy, alias: str, candidate: GateInput, holder: GateInput | None
             ) -> GateReport:
    """Check every gate of `policy` that applies to `alias` (holder: the alias's current holder)."""
    results = []
    for g in policy.gates:
        if not g.applies_to(alias):
            continue
        value, why = _value(g, candidate)
        if value is None:
            results.append(GateResult(g.name, "skip" if g.missing == "skip" else "fail", None,
                                      None, "", why))
            continue
        if g.metric == "security_max_severity" and str(value).lower() not in SEVERITIES:
            results.append(GateResult(g.name, "fail", value, None, "unknown severity"))
            continue
        results.append(_check(g, value, holder))
    return GateReport(alias, candidate.version, holder.version if holder else None,
                      policy.source, policy.sha256, tuple(results))
