"""Prometheus metrics with vLLM's names under a `trustmoe:` prefix, labelled by model_name.

Every server gets its own `CollectorRegistry` (several servers in one process, as in tests,
never collide). The engine thread records token timings; the HTTP side records requests
turned away. A server that answers with several engines (`serve/fleet.py`: production,
canary, shadow) makes its metrics with `versioned=True`: every series then also carries a
`version` label (`demo:3`), and `for_version(key, role)` gives the view one engine records
into; fleet-wide series are `trustmoe:served_version_info{version, role, digest}`,
`trustmoe:canary_percent`, `trustmoe:requests{version, role, status}` and
`trustmoe:reload_failures`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class _Families:
    """The metric families of one server (one registry); label names fixed at creation."""

    registry: CollectorRegistry
    versioned: bool
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    running: Gauge
    waiting: Gauge
    kv_usage: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    success: Counter
    rejected: Counter
    prefix_queries: Counter
    prefix_hits: Counter
    guard: Counter
    guard_seconds: Histogram
    # fleet-wide (versioned servers only)
    info: Gauge | None = None
    canary_percent: Gauge | None = None
    requests: Counter | None = None
    reload_failures: Counter | None = None

    @classmethod
    def create(cls, versioned: bool) -> _Families:
        r = CollectorRegistry()
        lab = ["model_name", "version"] if versioned else ["model_name"]
        fam = cls(
            registry=r, versioned=versioned,
            ttft=Histogram("trustmoe:time_to_first_token_seconds",
                           "Time from arrival to the first generated token.", lab,
                           buckets=TTFT_BUCKETS, registry=r),
            itl=Histogram("trustmoe:inter_token_latency_seconds",
                          "Time between consecutive generated tokens of one request.", lab,
                          buckets=ITL_BUCKETS, registry=r),
            e2e=Histogram("trustmoe:e2e_request_latency_seconds",
                          "Time from arrival to the request's last token.", lab,
                          buckets=E2E_BUCKETS, registry=r),
            running=Gauge("trustmoe:num_requests_running", "Requests in the running batch.", lab,
                          registry=r),
            waiting=Gauge("trustmoe:num_requests_waiting", "Requests waiting to be scheduled.",
                          lab, registry=r),
            kv_usage=Gauge("trustmoe:kv_cache_usage_perc",
                           "Fraction of KV-cache blocks in use (0..1).", lab, registry=r),
            prompt_tokens=Counter("trustmoe:prompt_tokens", "Prompt tokens processed.", lab,
                                  registry=r),
            generation_tokens=Counter("trustmoe:generation_tokens", "Tokens generated.", lab,
                                      registry=r),
            success=Counter("trustmoe:request_success", "Finished requests by finish reason.",
                            [*lab, "finished_reason"], registry=r),
            rejected=Counter("trustmoe:request_rejected", "Requests turned away, by HTTP status.",
                             [*lab, "status"], registry=r),
            prefix_queries=Counter("trustmoe:prefix_cache_queries",
                                   "Prompt tokens looked up in the prefix cache.", lab, registry=r),
            prefix_hits=Counter("trustmoe:prefix_cache_hits",
                                "Prompt tokens served from the prefix cache.", lab, registry=r),
            guard=Counter("trustmoe:guard_events", "Guard decisions, by rule and action "
                          "(flag, block, redact).", [*lab, "rule", "action"], registry=r),
            guard_seconds=Histogram("trustmoe:guard_scan_seconds",
                                    "Time the input guard took per request.", lab,
                                    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                             0.5), registry=r),
        )
        if versioned:
            fam.info = Gauge("trustmoe:served_version_info",
                             "1 for each version this server answers with (role, digest).",
                             ["model_name", "version", "role", "digest"], registry=r)
            fam.canary_percent = Gauge("trustmoe:canary_percent",
                                       "Share of requests (0..100) routed to the canary.",
                                       registry=r)
            fam.requests = Counter("trustmoe:requests", "Finished HTTP requests, by the version "
                                   "that answered and the status sent.",
                                   ["model_name", "version", "role", "status"], registry=r)
            fam.reload_failures = Counter("trustmoe:reload_failures",
                                          "Reloads that failed (the old engines kept serving).",
                                          registry=r)
        return fam


class ServerMetrics:
    """The metrics one engine records into (a view of its server's families)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, *, versioned: bool = False, version: str | None = None,
                 role: str = "production", families: _Families | None = None) -> None:
        self.families = families if families is not None else _Families.create(versioned)
        fam = self.families
        self.model_name, self.version, self.role = model_name, version, role
        self._lab: tuple[str, ...] = (model_name, version or "") if fam.versioned else (model_name,)
        lab = self._lab
        self.registry = fam.registry
        self.ttft = fam.ttft.labels(*lab)
        self.itl = fam.itl.labels(*lab)
        self.e2e = fam.e2e.labels(*lab)
        self.running = fam.running.labels(*lab)
        self.waiting = fam.waiting.labels(*lab)
        self.kv_usage = fam.kv_usage.labels(*lab)
        self.prompt_tokens = fam.prompt_tokens.labels(*lab)
        self.generation_tokens = fam.generation_tokens.labels(*lab)
        self.prefix_queries = fam.prefix_queries.labels(*lab)
        self.prefix_hits = fam.prefix_hits.labels(*lab)
        self.guard_seconds = fam.guard_seconds.labels(*lab)
        for reason in FINISH_REASONS:  # present at 0 from the start
            fam.success.labels(*lab, reason)

    def for_version(self, version: str, role: str = "production") -> ServerMetrics:
        """The view an engine serving `version` records into (same registry)."""
        return ServerMetrics(self.model_name, version=version, role=role, families=self.families)

    @property
    def canary_percent(self) -> Any:
        assert self.families.canary_percent is not None, "versioned metrics only"
        return self.families.canary_percent

    @property
    def reload_failures(self) -> Any:
        assert self.families.reload_failures is not None, "versioned metrics only"
        return self.families.reload_failures

    def served(self, versions: Iterable[Any]) -> None:
        """Set `served_version_info` to exactly `versions` (ServedVersion-like objects)."""
        info = self.families.info
        if info is None:
            return
        info.clear()
        for v in versions:
            info.labels(self.model_name, v.key, v.role, v.digest[:12]).set(1)

    def request(self, status: int) -> None:
        if self.families.requests is not None:
            self.families.requests.labels(self.model_name, self.version or "", self.role,
                                          str(status)).inc()

    def guard_event(self, rule: str, action: str) -> None:
        self.families.guard.labels(*self._lab, rule, action).inc()

    def finished(self, reason: str | None) -> None:
        self.families.success.labels(*self._lab, reason or "abort").inc()

    def rejected(self, status: int) -> None:
        self.families.rejected.labels(*self._lab, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
