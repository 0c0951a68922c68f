"""The monitor: per model version, windows of requests -> detectors and SLOs -> incidents -> action.

    mon = Monitor(policy, sink=my_sink, notifier=WebhookNotifier.from_policy(policy.webhook))
    mon.add_version(VersionInfo("demo:3", digest=..., ...), load_profile(eval_dir))  # calibrates
    for record in traffic:                  # one RequestRecord per finished request
        for incident in mon.observe(record):
            ...                             # already stored, acted on and notified
    mon.status()                            # everything the dashboard shows, JSON-ready

Drift windows count only requests that carry features; SLO windows count every request of
the version. A detector alarms after its `consecutive` windows in a row cross; then it stays
quiet for the cooldown (requests AND seconds) while its statistics are still recorded.
`observe` is thread-safe but does the work inline (calibration, webhook retries): the server
should call it from a background worker, not from the request path.

Wiring into the server (not done here):
- engine: per request, `FeatureAccumulator(prompt_ids, d, moe_layers, experts)` at admission;
  for each prefill chunk covering prompt positions [s, e): `add_hidden(final-norm rows (T, d))`,
  `add_routing(layer, experts (T, k))` per MoE layer, `add_logits(acc.scored_in(s, e), LM-head
  rows)` (at most MAX_SCORED = 4 rows per request); `finish()` when prefill ends. Positions served from the
  prefix cache are not recomputed, so their hidden/routing are missing from the means.
- server: one `RequestRecord` per finished request onto a queue; a worker calls `observe`.
- versions: `add_version(VersionInfo(...), load_profile(eval_dir))` for each served version
  (production and canary), again when an alias moves to a new version.
- `IncidentSink`: `store` into the registry database, `act` rolls the canary to 0% or the
  production alias back through the registry and says what it did (`ActionResult`).
- dashboard: `status()` (histories with thresholds per detector, SLOs, incidents), `explain()`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from trustmoe.deploy.drift import DriftSuite
from trustmoe.deploy.incidents import Incident, IncidentSink, MemorySink, hash_request_id
from trustmoe.deploy.notify import Notifier
from trustmoe.deploy.policy import Policy
from trustmoe.deploy.slo import SLOTracker
from trustmoe.engine.features import RequestFeatures
from trustmoe.eval.profile import Profile

HISTORY = 500  # windows of statistics kept per detector for the dashboard


@dataclass
class RequestRecord:
    """One finished request, as the server (or a replayed log line) reports it."""

    request_id: str
    version: str
    time: float  # arrival, unix seconds
    latency_s: float | None = None  # arrival to last token
    ttft_s: float | None = None  # arrival to first token
    error: bool = False  # 5xx or engine failure
    guard_blocked: bool = False  # refused by the prompt-injection guard
    features: RequestFeatures | None = None  # None for errors and blocked requests
    prompt: str | None = None  # kept in incidents only with log_prompts


@dataclass
class VersionInfo:
    """The chain back to origins that every incident of this version carries."""

    version: str  # registry name, e.g. "demo:3"
    digest: str | None = None  # model weights sha256
    dataset_manifest_sha256: str | None = None
    profile_ref: str | None = None  # set from the profile when left empty
    role: str | None = None  # "production" | "canary" | ..., for the sink's decision
    model: str | None = None  # registry model name (None when not served from a registry)
    alias: str | None = None  # registry alias the version is served under, e.g. "production"


@dataclass
class DetectorState:
    consecutive: int = 0
    quiet_until_request: int = -1
    quiet_until_time: float = 0.0
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))


class VersionWatch:
    def __init__(self, info: VersionInfo, profile: Profile, policy: Policy) -> None:
        self.info, self.policy = info, policy
        self.suite = DriftSuite(profile, window=policy.window, ert_requests=policy.ert_requests,
                                specs=policy.detectors, seed=policy.seed)
        self.slo = SLOTracker(policy.slo)
        self.buffer: list[RequestRecord] = []
        self.state: dict[str, DetectorState] = {}
        self.requests = 0  # every request of this version seen
        self.windows = 0  # drift windows evaluated

    def st(self, name: str) -> DetectorState:
        return self.state.setdefault(name, DetectorState())


class Monitor:
    def __init__(self, policy: Policy, sink: IncidentSink | None = None, notifier: Notifier | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.sink: IncidentSink = sink if sink is not None else MemorySink()
        self.notifier = notifier
        self.clock = clock
        self.watches: dict[str, VersionWatch] = {}
        self.incidents: deque[Incident] = deque(maxlen=1000)
        self._lock = threading.Lock()

    def add_version(self, info: VersionInfo, profile: Profile) -> None:
        """Start watching a version against its profile (calibrates its detectors: seconds)."""
        if not info.profile_ref:
            info.profile_ref = profile.ref or None
        if info.dataset_manifest_sha256 is None:
            info.dataset_manifest_sha256 = profile.meta.get("source", {}).get("dataset_manifest_sha256")
        watch = VersionWatch(info, profile, self.policy)
        with self._lock:
            self.watches[info.version] = watch

    def remove_version(self, version: str) -> None:
        with self._lock:
            self.watches.pop(version, None)

    def observe(self, record: RequestRecord) -> list[Incident]:
        """Take one finished request; return the incidents it opened (already stored/acted on)."""
        with self._lock:
            w = self.watches.get(record.version)
            if w is None:
                raise KeyError(f"version {record.version!r} is not watched; add_version() first")
            if record.features is not None:
                w.suite.check(record.features)
            w.requests += 1
            opened: list[Incident] = []
            for res in w.slo.add(record):
                opened += self._step(w, res.detector, res.crossed, res.details, res.records,
                                     w.policy.slo.consecutive, res.summary, res.statistic, res.threshold,
                                     "above", res.statistic, res.threshold, res.explain)
            if record.features is not None:
                w.buffer.append(record)
                if len(w.buffer) >= w.policy.window:
                    opened += self._drift_window(w)
            return opened

    def _drift_window(self, w: VersionWatch) -> list[Incident]:
        recs, w.buffer = w.buffer, []
        feats = [r.features for r in recs if r.features is not None]
        w.windows += 1
        opened: list[Incident] = []
        for res in w.suite.evaluate(feats):
            det = w.suite.detectors[res.detector]
            if res.crossed and res.detector == "hidden" and hasattr(det, "permutation_pvalue"):
                res.details["permutation_p"] = det.permutation_pvalue(feats)
            opened += self._step(w, res.detector, res.crossed, res.details, recs,
                                 w.suite.consecutive[res.detector], res.summary, res.statistic,
                                 res.threshold, res.direction, res.effect, res.floor, det.explain())
        return opened

    def _step(self, w: VersionWatch, name: str, crossed: bool, details: dict[str, Any],
              recs: list[RequestRecord], need: int, summary: str, stat: float, thr: float,
              direction: str, effect: float, floor: float, explain: str) -> list[Incident]:
        st = w.st(name)
        now = self.clock()
        st.consecutive = st.consecutive + 1 if crossed else 0
        quiet = w.requests <= st.quiet_until_request or now < st.quiet_until_time
        st.history.append({"window": len(st.history), "request": w.requests, "time": now,
                           "statistic": stat, "threshold": thr, "crossed": crossed, "quiet": quiet})
        if st.consecutive < need or quiet:
            return []
        st.consecutive = 0
        st.quiet_until_request = w.requests + self.policy.cooldown_requests
        st.quiet_until_time = now + self.policy.cooldown_s
        return [self._open(w, name, details, recs, need, summary, stat, thr, direction, effect, floor, explain)]

    def _open(self, w: VersionWatch, name: str, details: dict[str, Any], recs: list[RequestRecord],
              need: int, summary: str, stat: float, thr: float, direction: str, effect: float, floor: float,
              explain: str) -> Incident:
        p = self.policy
        sample = _sample(recs, p.sample_requests)
        inc = Incident(
            detector=name, version=w.info.version, statistic=float(stat), threshold=float(thr),
            direction=direction, effect=float(effect), floor=float(floor),
            explanation=f"{explain} This window: {summary}.",
            window={"size": len(recs), "first_request": w.requests - len(recs) + 1, "last_request": w.requests,
                    "start_time": recs[0].time if recs else None, "end_time": recs[-1].time if recs else None},
            consecutive=need, action=p.action_for(name), digest=w.info.digest,
            dataset_manifest_sha256=w.info.dataset_manifest_sha256, profile_ref=w.info.profile_ref,
            sample_request_ids=[hash_request_id(r.request_id) for r in sample],
            prompts=[r.prompt or "" for r in sample] if p.log_prompts else None,
            details=dict(details), opened_at=self.clock(), role=w.info.role, model=w.info.model,
            alias=w.info.alias)
        self.sink.store(inc)
        if inc.action != "notify":
            try:
                r = self.sink.act(inc)
                inc.action_result = r.message if r.performed else f"not performed: {r.message}"
            except Exception as e:  # an action that fails must still leave a stored incident
                inc.action_result = f"failed: {type(e).__name__}: {e}"
        else:
            inc.action_result = "notify only"
        if self.notifier is not None:
            d = self.notifier.notify(inc)
            inc.details["notification"] = {"ok": d.ok, "attempts": d.attempts, "status": d.status,
                                           "error": d.error}
        self.sink.store(inc)
        self.incidents.append(inc)
        return inc

    def explain(self, version: str) -> dict[str, str]:
        w = self.watches[version]
        return {**w.suite.explain(), **w.slo.explain()}

    def status(self) -> dict[str, Any]:
        """JSON-ready state of every watched version: detectors (with history), SLOs, incidents."""
        with self._lock:
            out: dict[str, Any] = {"versions": {}, "incidents": [i.to_dict() for i in self.incidents]}
            for v, w in self.watches.items():
                dets = {}
                for name, text in {**w.suite.explain(), **w.slo.explain()}.items():
                    st = w.state.get(name, DetectorState())
                    dets[name] = {"explain": text, "consecutive": st.consecutive,
                                  "quiet_until_request": st.quiet_until_request,
                                  "quiet_until_time": st.quiet_until_time, "history": list(st.history)}
                out["versions"][v] = {"info": asdict(w.info), "requests": w.requests, "windows": w.windows,
                                      "pending": len(w.buffer), "detectors": dets, "slo": w.slo.status()}
            return _finite(out)


def _sample(recs: list[RequestRecord], n: int) -> list[RequestRecord]:
    """Up to n records spread evenly over the window (or the worst ones, first, for SLOs)."""
    if n <= 0 or not recs:
        return []
    if len(recs) <= n:
        return list(recs)
    idx = np.unique(np.linspace(0, len(recs) - 1, n).round().astype(int))
    return [recs[i] for i in idx]


def _finite(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, np.generic):
        return _finite(x.item())
    return x
