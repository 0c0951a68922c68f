"""Live monitoring inside the server: the fleet's finished requests -> `Monitor` -> incidents.

    live = LiveMonitor(fleet, policy, registry=reg, log_prompts=False)
    live.start()        # subscribes to fleet.on_finished / fleet.on_swap, starts the worker
    ...
    live.status()       # what /dashboard shows (JSON-ready)
    live.stop()

`fleet.on_finished` hands each finished request to `submit`, which only puts a record on a
bounded queue (never blocks, never raises into the request path; a full queue drops the
record and counts it). One background thread takes records off the queue and calls
`Monitor.observe`, where windows close, detectors run, incidents are stored in the registry
database, actions are taken (`RegistrySink`: canary to 0% through the fleet, production alias
rollback through the registry, then `fleet.reload()`) and the webhook is notified.

`fleet.on_swap` (a hot swap, a promotion, a canary change) makes the worker re-read
`fleet.versions()`: each served version is watched against the profile in its eval dir
(`load_profile(version.eval_dir)`, calibrated on the worker, seconds), with its lineage
(digest, dataset manifest SHA-256, the profile's eval dir); a version without a profile is
served but not watched, and `status()` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trustmoe.deploy.incidents import IncidentStore, RegistrySink
from trustmoe.deploy.monitor import Monitor, RequestRecord, VersionInfo
from trustmoe.deploy.notify import WebhookNotifier
from trustmoe.deploy.policy import Policy
from trustmoe.engine.features import RequestFeatures

if TYPE_CHECKING:
    from fastapi import FastAPI

    from trustmoe.deploy.registry import Registry

log = logging.getLogger("trustmoe.monitor")
QUEUE_MAX = 10_000  # finished requests waiting for the worker; more are dropped (and counted)


class ServedVersionLike(Protocol):
    """What the monitor reads of `trustmoe.serve.fleet.ServedVersion`."""

    key: str
    name: str
    version: int
    digest: str
    role: str
    model_dir: Path
    eval_dir: Path | None
    dataset_manifest_sha256: str | None


class FinishedRequestLike(Protocol):
    """What the monitor reads of `trustmoe.serve.fleet.FinishedRequest`."""

    version: Any  # the ServedVersion that answered (or its key)
    request_id: str
    status: int  # HTTP status (>= 500: an error)
    latency_s: float | None
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    guard_blocked: bool
    user_hash: str | None
    features: RequestFeatures | None


class FleetLike(Protocol):
    def versions(self) -> list[Any]: ...

    def set_canary_percent(self, p: float) -> Any: ...

    def canary_percent(self) -> float: ...

    def reload(self) -> Any: ...

    def on_finished(self, fn: Callable[[Any], Any]) -> Any: ...

    def on_swap(self, fn: Callable[..., Any]) -> Any: ...


_SYNC = object()  # queue marker: re-read fleet.versions()
_STOP = object()


@dataclass
class LiveCounters:
    submitted: int = 0
    observed: int = 0
    dropped: int = 0  # queue full
    unwatched: int = 0  # requests of versions without a profile
    failed: int = 0  # observe raised (logged)
    not_watched: dict[str, str] = field(default_factory=dict)  # version key -> why


def record_of(fr: Any, log_prompts: bool = False, prompt: str | None = None) -> RequestRecord:
    """A fleet `FinishedRequest` as the monitor's `RequestRecord` (arrival = now - latency)."""
    lat = fr.latency_s
    now = time.time()
    v = fr.version
    return RequestRecord(
        request_id=str(fr.request_id), version=str(v.key) if hasattr(v, "key") else str(v),
        time=now - lat if lat is not None else now, latency_s=lat, ttft_s=fr.ttft_s,
        error=int(fr.status) >= 500, guard_blocked=bool(fr.guard_blocked), features=fr.features,
        prompt=prompt if log_prompts else None)


class LiveMonitor:
    def __init__(self, fleet: FleetLike, policy: Policy, *, registry: Registry | None = None,
                 store: IncidentStore | None = None, log_prompts: bool | None = None,
                 queue_max: int = QUEUE_MAX) -> None:
        if log_prompts is not None:
            policy.log_prompts = bool(log_prompts)
        self.fleet, self.policy, self.registry = fleet, policy, registry
        self.store = store if store is not None else (IncidentStore(registry) if registry else None)
        sink = RegistrySink(self.store, registry, set_canary_percent=fleet.set_canary_percent,
                            after_rollback=fleet.reload) if self.store is not None else None
        notifier = WebhookNotifier.from_policy(policy.webhook) if policy.webhook else None
        self.monitor = Monitor(policy, sink=sink, notifier=notifier)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=queue_max)
        self.counters = LiveCounters()
        self._served: dict[str, tuple[str, str | None]] = {}  # key -> (digest, role) watched
        self._thread: threading.Thread | None = None
        self._want_sync = False
        self._subscribed = False

    # ------------------------------------------------------------ the request path

    def submit(self, fr: Any, prompt: str | None = None) -> None:
        """Called by the fleet for each finished request: enqueue only (never blocks)."""
        self.counters.submitted += 1
        try:
            self.q.put_nowait(record_of(fr, self.policy.log_prompts, prompt))
        except queue.Full:
            self.counters.dropped += 1
        except Exception:  # a malformed FinishedRequest must not reach the client
            self.counters.failed += 1
            log.exception("monitor: cannot read a finished request")

    def on_swap(self, *_args: Any, **_kw: Any) -> None:
        """Called by the fleet after a swap (any signature): the worker re-reads the fleet
        before its next record (the marker only wakes it; a full queue cannot lose the swap)."""
        self._want_sync = True
        with contextlib.suppress(queue.Full):
            self.q.put_nowait(_SYNC)

    # ------------------------------------------------------------ the worker

    def start(self) -> LiveMonitor:
        if self._thread is not None:
            return self
        self._want_sync = True
        self._thread = threading.Thread(target=self._run, name="trustmoe-monitor", daemon=True)
        self._thread.start()
        if not self._subscribed:  # once: a restarted worker reads the same subscriptions
            self._subscribed = True
            self.fleet.on_swap(self.on_swap)
            self.fleet.on_finished(self.submit)
        self.q.put(_SYNC)  # watch the versions now, not at the first request
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self.q.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until every record queued so far was observed (tests, shutdown)."""
        done = threading.Event()
        self.q.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            try:
                if self._want_sync:
                    self._want_sync = False
                    self.sync()
                if isinstance(item, threading.Event):
                    item.set()
                elif item is not _SYNC:
                    self._observe(item)
            except Exception:  # the worker outlives any one bad record or registry hiccup
                self.counters.failed += 1
                log.exception("monitor worker")

    def _observe(self, rec: RequestRecord) -> None:
        if rec.version not in self.monitor.watches:
            self.counters.unwatched += 1
            return
        for inc in self.monitor.observe(rec):
            log.warning("incident %s: %s on %s -> %s", inc.id, inc.detector, inc.version, inc.action_result)
        self.counters.observed += 1

    def sync(self) -> None:
        """Watch every served version (new ones calibrated, roles updated, gone ones dropped)."""
        from trustmoe.eval.profile import load_profile
        from trustmoe.io import TrustmoeError

        served = {str(v.key): v for v in self.fleet.versions()}
        for key in set(self._served) - set(served):
            self.monitor.remove_version(key)
            del self._served[key]
        for key, v in served.items():
            role = str(v.role) if v.role is not None else None
            have = self._served.get(key)
            if have is not None and have[0] == v.digest:
                if have[1] != role:  # a promotion: same weights, new role
                    info = self.monitor.watches[key].info
                    info.role, info.alias = role, _alias(role, getattr(v, "ref", ""))
                    self._served[key] = (v.digest, role)
                continue
            if v.eval_dir is None:
                self.counters.not_watched[key] = "no eval dir (register it with --eval to monitor it)"
                continue
            try:
                profile = load_profile(Path(v.eval_dir))
            except TrustmoeError as e:
                self.counters.not_watched[key] = str(e)
                continue
            info = VersionInfo(version=key, digest=v.digest, dataset_manifest_sha256=v.dataset_manifest_sha256,
                               role=role, model=v.name, alias=_alias(role, getattr(v, "ref", "")))
            self.monitor.add_version(info, profile)
            self.counters.not_watched.pop(key, None)
            self._served[key] = (v.digest, role)
            log.info("monitoring %s (%s) against %s", key, role, info.profile_ref)

    # ------------------------------------------------------------ what the dashboard reads

    def status(self) -> dict[str, Any]:
        st = self.monitor.status()
        st["served"] = [_served_dict(v) for v in self.fleet.versions()]
        st["canary_percent"] = self.fleet.canary_percent()
        c = self.counters
        st["queue"] = {"waiting": self.q.qsize(), "submitted": c.submitted, "observed": c.observed,
                       "dropped": c.dropped, "unwatched": c.unwatched, "failed": c.failed,
                       "not_watched": dict(c.not_watched)}
        st["policy"] = {"window": self.policy.window, "ert_requests": self.policy.ert_requests,
                        "act": list(self.policy.act), "action": self.policy.action,
                        "consecutive": self.policy.consecutive}
        if self.store is not None:
            with contextlib.suppress(Exception):  # the in-memory list still shows
                st["incidents"] = [i.to_dict() for i in self.store.list(limit=100)]
        st["aliases"] = self._aliases()
        return st

    def _aliases(self) -> dict[str, Any]:
        if self.registry is None:
            return {}
        out: dict[str, Any] = {}
        for name in sorted({str(v.name) for v in self.fleet.versions()}):
            try:
                hist = self.registry.history(name)
            except Exception as e:  # shown, not raised: the page must render
                out[name] = {"error": str(e)}
                continue
            current: dict[str, int] = {}
            for ev in hist:
                current[ev.alias] = ev.version
            out[name] = {"current": current, "history": [
                {"alias": e.alias, "seq": e.seq, "action": e.action, "version": e.version,
                 "previous_version": e.previous_version, "at": e.at.isoformat(), "by": e.by,
                 "why": e.why} for e in hist[-50:]]}
        return out


def _alias(role: str | None, ref: str = "") -> str | None:
    """The registry alias a production version is served from (the one rolled back): the
    alias of its ref (`registry:NAME@ALIAS`), else "production"; None for other roles."""
    if role != "production":
        return None
    if ref.startswith("registry:") and "@" in ref:
        tail = ref.rsplit("@", 1)[1]
        return None if tail.isdigit() else tail  # a pinned version follows no alias
    return "production"


def attach(app: FastAPI, policy_path: Path, *, log_prompts: bool = False) -> LiveMonitor:
    """`trustmoe serve --monitor monitor.toml`: watch `app.state.fleet`, add /dashboard.

    The worker runs with the app: it starts after the fleet's engines in the app's lifespan
    and stops (what it queued observed first) before they close, and the registry and
    incident store opened here close with it. The app's own lifespan is wrapped, not
    replaced, so `create_app` needs no monitoring hook."""
    from trustmoe.deploy.policy import load_policy
    from trustmoe.deploy.registry import Registry
    from trustmoe.serve import dashboard

    fleet = app.state.fleet
    policy = load_policy(policy_path)
    url = getattr(fleet.config, "registry_url", None)
    registry = None
    if any(getattr(v, "ref", "").startswith("registry:") for v in fleet.versions()):
        registry = Registry.open(url, create=False)
    store = IncidentStore(registry if registry is not None else url)
    live = LiveMonitor(fleet, policy, registry=registry, store=store, log_prompts=log_prompts)
    app.state.monitor = live
    app.include_router(dashboard.router(live.status))
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:  # the fleet's engines run from here
            live.start()
            try:
                yield state
            finally:  # before the engines close, so a rollback can still reload the fleet
                await asyncio.to_thread(live.stop)
                store.close()
                if registry is not None:
                    registry.close()

    app.router.lifespan_context = lifespan
    return live


def _served_dict(v: Any) -> dict[str, Any]:
    return {"key": str(v.key), "name": str(v.name), "version": int(v.version), "digest": str(v.digest),
            "role": v.role, "model_dir": str(v.model_dir), "eval_dir": None if v.eval_dir is None else str(v.eval_dir),
            "dataset_manifest_sha256": v.dataset_manifest_sha256}
