"""Prometheus metrics with vLLM's names under a `trustmoe:` prefix, labelled by model_name.

Every server gets its own `CollectorRegistry` (several servers in one process, as in tests,
never collide). The engine thread records token timings; the HTTP side records requests
turned away.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, lab = self.registry, ["model_name"]
        self.ttft = Histogram("trustmoe:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", lab,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("trustmoe:inter_token_latency_seconds",
                             "Time between consecutive generated tokens of one request.", lab,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("trustmoe:e2e_request_latency_seconds",
                             "Time from arrival to the request's last token.", lab,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.running = Gauge("trustmoe:num_requests_running",
                             "Requests in the running batch.", lab, registry=r).labels(model_name)
        self.waiting = Gauge("trustmoe:num_requests_waiting", "Requests waiting to be scheduled.",
                             lab, registry=r).labels(model_name)
        self.kv_usage = Gauge("trustmoe:kv_cache_usage_perc",
                              "Fraction of KV-cache blocks in use (0..1).", lab,
                              registry=r).labels(model_name)
        self.prompt_tokens = Counter("trustmoe:prompt_tokens", "Prompt tokens processed.", lab,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("trustmoe:generation_tokens", "Tokens generated.", lab,
                                         registry=r).labels(model_name)
        self._success = Counter("trustmoe:request_success",
                                "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        for reason in FINISH_REASONS:  # present at 0 from the start
            self._success.labels(model_name, reason)
        self._rejected = Counter("trustmoe:request_rejected",
                                 "Requests turned away, by HTTP status.",
                                 ["model_name", "status"], registry=r)
        self.prefix_queries = Counter("trustmoe:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.", lab,
                                      registry=r).labels(model_name)
        self.prefix_hits = Counter("trustmoe:prefix_cache_hits",
                                   "Prompt tokens served from the prefix cache.", lab,
                                   registry=r).labels(model_name)

        self._guard = Counter("trustmoe:guard_events", "Guard decisions, by rule and action "
                              "(flag, block, redact).", ["model_name", "rule", "action"], registry=r)
        self.guard_seconds = Histogram("trustmoe:guard_scan_seconds",
                                       "Time the input guard took per request.", lab,
                                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                0.5), registry=r).labels(model_name)

    def guard_event(self, rule: str, action: str) -> None:
        self._guard.labels(self.model_name, rule, action).inc()

    def finished(self, reason: str | None) -> None:
        self._success.labels(self.model_name, reason or "abort").inc()

    def rejected(self, status: int) -> None:
        self._rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
