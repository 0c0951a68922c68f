"""Service levels per model version over tumbling windows of requests.

Each configured limit is checked once per window of `[slo].window` requests: p99 latency and
p99 time to first token (over requests that completed), error rate and guard block rate (over
all). A metric with nothing to measure in a window (no completed request, no TTFT reported)
is *inconclusive*: that is recorded and shown, never counted as a pass (argo-rollouts#3850).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.deploy.policy import SLOPolicy

if TYPE_CHECKING:
    from trustmoe.deploy.monitor import RequestRecord

WORDS = {
    "p99_latency_s": ("p99 latency", "s", "99% of completed requests finish within"),
    "p99_ttft_s": ("p99 time to first token", "s", "99% of completed requests get their first token within"),
    "max_error_rate": ("error rate", "", "at most this share of requests fails:"),
    "max_guard_block_rate": ("guard block rate", "", "at most this share of requests is blocked by the guard:"),
}


@dataclass
class SLOResult:
    detector: str  # "slo.<limit>"
    statistic: float
    threshold: float
    crossed: bool
    summary: str
    explain: str
    records: list[RequestRecord] = field(default_factory=list)  # the worst requests, for samples
    details: dict[str, Any] = field(default_factory=dict)


class SLOTracker:
    def __init__(self, policy: SLOPolicy) -> None:
        self.policy = policy
        self.buffer: list[RequestRecord] = []
        self.last: dict[str, Any] = {}
        self.inconclusive: dict[str, int] = {k: 0 for k in policy.limits()}
        self.windows = 0

    def add(self, rec: RequestRecord) -> list[SLOResult]:
        if not self.policy.limits():
            return []
        self.buffer.append(rec)
        if len(self.buffer) < self.policy.window:
            return []
        recs, self.buffer = self.buffer, []
        self.windows += 1
        out = []
        self.last = {"window": self.windows, "requests": len(recs)}
        for name, limit in self.policy.limits().items():
            value, worst = _measure(name, recs)
            if value is None:
                self.inconclusive[name] += 1
                self.last[name] = None
                continue
            self.last[name] = value
            label, unit, _ = WORDS[name]
            crossed = value > limit
            summary = (f"{label} {value:.4g}{unit} {'exceeds' if crossed else 'meets'} the limit "
                       f"{limit:g}{unit} over {len(recs)} requests")
            out.append(SLOResult(f"slo.{name}", value, limit, crossed, summary, self.explain()[f"slo.{name}"],
                                 worst, {"requests": len(recs), "value": value, "limit": limit}))
        return out

    def explain(self) -> dict[str, str]:
        out = {}
        for name, limit in self.policy.limits().items():
            label, unit, words = WORDS[name]
            k = self.policy.consecutive
            runs = f"{k} windows in a row" if k > 1 else "one window"
            out[f"slo.{name}"] = (f"Service level ({label}): {words} {limit:g}{unit}, checked every "
                                  f"{self.policy.window} requests of this version; {runs} over the limit "
                                  "opens an incident. A fixed limit, not a statistical test: no ERT applies.")
        return out

    def status(self) -> dict[str, Any]:
        return {"limits": self.policy.limits(), "window": self.policy.window, "pending": len(self.buffer),
                "windows": self.windows, "last": self.last, "inconclusive_windows": dict(self.inconclusive)}


def _measure(name: str, recs: list[RequestRecord]) -> tuple[float | None, list[RequestRecord]]:
    ok = [r for r in recs if not r.error and not r.guard_blocked]
    if name in ("p99_latency_s", "p99_ttft_s"):
        attr = "latency_s" if name == "p99_latency_s" else "ttft_s"
        have = [r for r in ok if getattr(r, attr) is not None]
        if not have:
            return None, []
        vals = np.array([getattr(r, attr) for r in have], dtype=np.float64)
        order = np.argsort(-vals)
        return float(np.percentile(vals, 99)), [have[i] for i in order]
    flag = "error" if name == "max_error_rate" else "guard_blocked"
    bad = [r for r in recs if getattr(r, flag)]
    return len(bad) / len(recs), bad
