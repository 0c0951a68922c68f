"""The engines one server answers with: production, an optional canary and an optional shadow.

A `Fleet` owns one `Slot` per role. Each slot is a loaded engine with its own bridge thread
and `ServerState` (tokenizer, chat template, JSON-mode caches), all slots of a server share one
concurrency limit and one Prometheus registry (every metric carries a `version` label). There
are no process globals: two servers in one process share nothing.

Where the models come from (`model_ref`, `--canary`, `--shadow`):

- `registry:NAME@ALIAS` (or `NAME@ALIAS` for canary/shadow): resolved through
  `Registry.resolve` to a content digest and a verified read-only directory, and *followed*:
  `reload()` (polled with `--follow`, or `POST /admin/reload`) re-reads the alias (a cheap
  database read) and swaps the slot when its digest moved.
- `registry:NAME@VERSION`: pinned; never moves.
- a plain model directory: pinned; its digest is the SHA-256 of `model.safetensors`.

Hot swap: the new engine loads in the caller's thread while the old one keeps serving; the
slot is replaced in one assignment, so new requests go to the new engine; every request holds
a reference to the slot it started on and finishes there; a retiring slot's bridge is shut down
(and its engine freed) once its last request let go. A reload that fails (unreachable registry,
corrupt blob, a model that does not load) changes nothing: the old engine keeps serving and the
error is raised as a `ReloadError` with one clear line.

Routing: a request goes to the canary with probability `canary_percent`/100, sticky per user:
the SHA-256 of the request's `user` field (or `x-trustmoe-user` header) picks a bucket in
[0, 100), so one user always sees the same version for a given percentage; requests without a
user are split at random. A request whose `model` names a served version key (`demo:4`) is
pinned to it. Shadowing is separate (`serve/shadow.py`): the shadow never answers a client.

Monitoring plugs in with `on_finished` (one `FinishedRequest` per HTTP request, any outcome;
called on a background thread, never on the request path) and `on_swap` (the versions served
after each swap).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmoe.config import SERVER_MAX_CONCURRENCY, EngineConfig
from trustmoe.io import TrustmoeError
from trustmoe.serve.sources import Source, parse_source, resolve_source

if TYPE_CHECKING:
    from trustmoe.security.guard import Guard
    from trustmoe.serve.bridge import ServedEngine
    from trustmoe.serve.metrics import ServerMetrics
    from trustmoe.serve.shadow import ShadowRunner
    from trustmoe.serve.state import ServerState
    from trustmoe.serve.tracking import RequestTracker

log = logging.getLogger("trustmoe.serve")

ROLES = ("production", "canary", "shadow")
USER_HEADER = "x-trustmoe-user"
MODEL_HEADER = "x-trustmoe-model"
RETIRE_TIMEOUT_S = 600.0  # a retiring engine waits this long for its last request at most


@dataclass(frozen=True)
class ServedVersion:
    key: str  # "demo:3" (name:version); a plain model dir: its dir name
    name: str
    version: int | None  # None for a plain model dir
    digest: str  # registry digest, or sha256 of model.safetensors
    role: str  # "production" | "canary" | "shadow"
    model_dir: Path
    eval_dir: Path | None  # the version's registered eval dir (profile.* for drift)
    dataset_manifest_sha256: str | None
    ref: str = ""  # what it was resolved from ("registry:demo@production", a path)

    @property
    def header(self) -> str:
        """The `x-trustmoe-model` value: `name:version@sha256:<first 12 hex of the digest>`
        (`dirname@sha256:...` for a plain model dir; the bare name for an engine passed in)."""
        return f"{self.key}@sha256:{self.digest[:12]}" if self.digest else self.key

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "version": self.version, "digest": self.digest,
                "role": self.role, "model_dir": str(self.model_dir),
                "eval_dir": str(self.eval_dir) if self.eval_dir else None,
                "dataset_manifest_sha256": self.dataset_manifest_sha256, "ref": self.ref,
                "header": self.header}


@dataclass(frozen=True)
class FinishedRequest:  # one per finished HTTP request, any outcome
    version: ServedVersion
    request_id: str
    status: int  # HTTP status sent (200, 400, 429, 499 client gone, 500...)
    latency_s: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    guard_blocked: bool
    user_hash: str | None  # sha256 of the sticky key (user field / header), never raw
    features: Any | None  # trustmoe.engine.features.RequestFeatures when the engine made them
    endpoint: str = ""  # "/v1/completions" | "/v1/chat/completions"
    finished_at: float = 0.0  # time.time() when it finished


class ReloadError(TrustmoeError):
    """A reload that could not happen; the engines served before are served still."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything a server is built from besides the model ref (`create_app(model_ref, config)`)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    registry_url: str | None = None  # default: $TRUSTMOE_REGISTRY or ~/.trustmoe/registry.db
    canary: str | None = None  # "NAME@canary", "registry:NAME@4" or a model dir
    canary_percent: float = 0.0
    shadow: str | None = None  # "NAME@candidate", ...
    shadow_percent: float = 100.0  # share of requests copied to the shadow
    shadow_log: Path | None = None  # JSONL of paired comparisons
    shadow_max_pending: int = 4  # shadow jobs queued at most; more are skipped, never waited for
    follow: bool = False  # poll the aliases and swap when one moves
    poll_seconds: float = 5.0
    max_concurrency: int = SERVER_MAX_CONCURRENCY
    api_key: str | None = None
    served_model_name: str | None = None  # default: the registry name, or the dir name
    guard: Guard | None = None  # default: the built-in policy

    def validate(self) -> ServeConfig:
        if not 0.0 <= self.canary_percent <= 100.0:
            raise TrustmoeError(f"--canary-percent must be within 0..100, got {self.canary_percent}")
        if not 0.0 <= self.shadow_percent <= 100.0:
            raise TrustmoeError(f"--shadow-percent must be within 0..100, got {self.shadow_percent}")
        if self.canary_percent > 0 and self.canary is None:
            raise TrustmoeError("--canary-percent needs --canary NAME@ALIAS")
        if not 0.05 <= self.poll_seconds <= 86400:
            raise TrustmoeError(f"--poll-seconds must be within 0.05..86400, got {self.poll_seconds}")
        if self.shadow_max_pending < 1:
            raise TrustmoeError("shadow_max_pending must be >= 1")
        return self


def user_hash(key: str | None) -> str | None:
    return None if not key else hashlib.sha256(key.encode("utf-8")).hexdigest()


def user_bucket(hashed: str) -> float:
    """A user's place in [0, 100): the first 32 bits of the hash of the sticky key."""
    return int(hashed[:8], 16) / 2**32 * 100.0


# ---------------------------------------------------------------------------- slots


@dataclass
class Slot:
    """One loaded engine and what the server keeps for it."""

    version: ServedVersion
    state: ServerState
    refs: int = 0  # requests that started on this slot and have not finished
    retiring: bool = False
    loaded_at: float = field(default_factory=time.time)

    def acquire(self) -> Slot:
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1


EngineFactory = Callable[[Path, EngineConfig], "ServedEngine"]


def default_engine_factory(model_dir: Path, config: EngineConfig) -> ServedEngine:
    from trustmoe.engine import Engine

    return Engine(model_dir, config)


class Fleet:
    """The engines one server answers with (see the module docstring)."""

    def __init__(self, model_ref: str | Path, config: ServeConfig | None = None, *,
                 engine_factory: EngineFactory | None = None) -> None:
        self._setup(config, engine_factory)
        self._sources["production"] = parse_source("production", str(model_ref),
                                                   bare_is_registry=False)
        if self.config.canary:
            self._sources["canary"] = parse_source("canary", self.config.canary, bare_is_registry=True)
        if self.config.shadow:
            self._sources["shadow"] = parse_source("shadow", self.config.shadow, bare_is_registry=True)
        try:
            for role, src in self._sources.items():  # every engine loads before serving starts
                self._slots[role] = self._load(src, self._resolve(src))
        except BaseException:
            self.close()
            raise
        self._after_load()

    @classmethod
    def of_engine(cls, engine: ServedEngine, config: ServeConfig | None = None, *,
                  chat_template: Any = None, served_names: list[str] | None = None) -> Fleet:
        """A fleet of one engine already built (`create_app(engine)`): nothing to follow, and
        metrics without a version label, as a single-engine server always had."""
        from trustmoe.serve.state import ServerState

        self = cls.__new__(cls)
        self._setup(config, None)
        name = self.served_name or engine.model_name or "trustmoe"
        state = ServerState(engine, model_name=name, served_names=served_names,
                            max_concurrency=self.config.max_concurrency, chat_template=chat_template,
                            api_key=self.config.api_key, admission=self.admission)
        state.guard = self.guard  # type: ignore[attr-defined]
        path = Path(str(getattr(engine, "model_dir", "") or name))
        v = ServedVersion(name, name, None, "", "production", path, None, None, name)
        state.version = v  # type: ignore[attr-defined]
        self._slots["production"] = Slot(v, state)
        self._after_load()
        return self

    def _setup(self, config: ServeConfig | None, engine_factory: EngineFactory | None) -> None:
        self.config = (config or ServeConfig()).validate()
        self._factory = engine_factory or default_engine_factory
        self._sources: dict[str, Source] = {}
        self._registry: Any = None
        self._slots: dict[str, Slot] = {}
        self._retiring: list[Slot] = []
        self._canary_percent = self.config.canary_percent
        self._rng = random.Random()
        self._reload_lock = threading.Lock()
        self._pick_lock = threading.Lock()  # choosing a slot and taking its reference vs a swap
        self._finished_fns: list[Callable[[FinishedRequest], None]] = []
        self._swap_fns: list[Callable[[list[ServedVersion]], None]] = []
        self._notify_q: queue.SimpleQueue[tuple[Callable[[Any], None], Any] | None] = queue.SimpleQueue()
        self._notifier: threading.Thread | None = None
        self._follower: threading.Thread | None = None
        self._stop = threading.Event()
        self.closed = False
        self.reloads = 0
        self.last_reload_error: str | None = None
        from trustmoe.security.guard import Guard
        from trustmoe.serve.metrics import ServerMetrics
        from trustmoe.serve.state import Admission

        self.guard: Guard = self.config.guard if self.config.guard is not None else Guard()
        self.admission = Admission(self.config.max_concurrency)
        self.metrics_root: ServerMetrics | None = None  # made with the first slot's name
        self.served_name = self.config.served_model_name
        self._make_metrics = ServerMetrics
        self.shadow: ShadowRunner | None = None

    def _after_load(self) -> None:
        self._publish_info()
        if "shadow" in self._slots:
            from trustmoe.serve.shadow import ShadowRunner

            self.shadow = ShadowRunner(self, self.config.shadow_percent, self.config.shadow_log,
                                       self.config.shadow_max_pending,
                                       self.production.state.metrics.registry)

    # ------------------------------------------------------------------ the interface

    def versions(self) -> list[ServedVersion]:
        return [self._slots[r].version for r in ROLES if r in self._slots]

    def set_canary_percent(self, percent: float) -> None:
        """0: all traffic to production."""
        p = float(percent)
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"canary percent must be within 0..100, got {percent}")
        if p > 0 and "canary" not in self._slots:
            raise ValueError("this server has no canary (start it with --canary NAME@ALIAS)")
        self._canary_percent = p
        if self.metrics_root is not None:
            self.metrics_root.canary_percent.set(p)

    def canary_percent(self) -> float:
        return self._canary_percent

    def reload(self) -> list[ServedVersion]:
        """Re-resolve every followed alias now; swap what moved; the versions that changed.
        Raises ReloadError (nothing changed) when the registry or a new engine fails."""
        with self._reload_lock:
            if self.closed:
                raise ReloadError("the server is shutting down")
            moved: list[ServedVersion] = []
            try:
                for role, src in self._sources.items():
                    if not src.follows:
                        continue
                    current = self._slots[role].version
                    info = self._registry_get(src)
                    if info.digest == current.digest:
                        continue
                    pinned = replace(src, registry_ref=f"{info.name}@{info.version}")
                    new = self._load(src, self._resolve(pinned))
                    with self._pick_lock:  # no request can be between choosing and holding
                        old = self._slots[role]
                        self._slots[role] = new  # new requests go to the new engine
                        old.retiring = True
                    self._retire(old)
                    moved.append(new.version)
                    log.info("swapped %s: %s -> %s", role, old.version.header, new.version.header)
            except TrustmoeError as e:
                self.last_reload_error = str(e)
                if self.metrics_root is not None:
                    self.metrics_root.reload_failures.inc()
                raise ReloadError(f"reload failed, still serving "
                                  f"{', '.join(v.header for v in self.versions())}: {e}") from None
            finally:
                if moved:
                    self.reloads += 1
                    self._publish_info()
                    for fn in self._swap_fns:
                        self._notify(fn, self.versions())
            self.last_reload_error = None
            return moved

    def on_finished(self, fn: Callable[[FinishedRequest], None]) -> None:
        """Call `fn` with every FinishedRequest, on the fleet's notifier thread."""
        self._finished_fns.append(fn)

    def on_swap(self, fn: Callable[[list[ServedVersion]], None]) -> None:
        self._swap_fns.append(fn)

    # ------------------------------------------------------------------ serving side

    @property
    def production(self) -> Slot:
        return self._slots["production"]

    def slot(self, role: str) -> Slot | None:
        return self._slots.get(role)

    def served_names(self) -> list[str]:
        """What /v1/models lists: the served name and every answering version's key."""
        names: set[str] = set()
        for role in ("production", "canary"):
            s = self._slots.get(role)
            if s is not None:
                names |= s.state.served_names
        return sorted(names)

    def sample_shadow(self) -> bool:
        """Whether a new request is copied to the shadow (`shadow_percent`)."""
        return self.shadow is not None and self.shadow.sample()

    def shadow_copy(self, tracker: RequestTracker, fr: FinishedRequest) -> None:
        if self.shadow is not None:
            self.shadow.submit(tracker, fr)

    def pick(self, hashed_user: str | None, model: str | None = None) -> Slot:
        """The slot a new request runs on (its reference taken: release it when done)."""
        with self._pick_lock:
            return self._choose(hashed_user, model).acquire()

    def hold(self, role: str) -> Slot | None:
        """The slot of `role` with a reference taken (None when there is none)."""
        with self._pick_lock:
            s = self._slots.get(role)
            return s.acquire() if s is not None else None

    def _choose(self, hashed_user: str | None, model: str | None) -> Slot:
        canary = self._slots.get("canary")
        if model is not None:
            for role in ("production", "canary"):
                s = self._slots.get(role)
                if s is not None and model == s.version.key:
                    return s
        p = self._canary_percent
        if canary is not None and p > 0:
            x = user_bucket(hashed_user) if hashed_user else self._rng.random() * 100.0
            if x < p:
                return canary
        return self.production

    @property
    def ready(self) -> bool:
        return not self.closed and self.production.state.bridge.alive and not self.production.retiring

    def finished(self, fr: FinishedRequest) -> None:
        for fn in self._finished_fns:
            self._notify(fn, fr)

    def start(self) -> None:
        """Start every slot's engine thread (and the alias poller with `follow`)."""
        for s in self._slots.values():
            s.state.bridge.start()
        if self.config.follow and any(s.follows for s in self._sources.values()):
            self._follower = threading.Thread(target=self._follow, name="trustmoe-follow",
                                              daemon=True)
            self._follower.start()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        with self._reload_lock:
            for s in [*self._slots.values(), *self._retiring]:
                s.state.bridge.shutdown()
            self._retiring.clear()
        if self._follower is not None:
            self._follower.join(5)
        self._notify_q.put(None)
        if self._notifier is not None:
            self._notifier.join(5)
        if self._registry is not None:
            self._registry.close()

    # ------------------------------------------------------------------ internals

    def _open_registry(self) -> Any:
        if self._registry is None:
            from trustmoe.deploy.registry import Registry

            self._registry = Registry.open(self.config.registry_url, create=False)
        return self._registry

    def _registry_get(self, src: Source) -> Any:
        assert src.registry_ref is not None
        return self._open_registry().get(src.registry_ref)

    def _resolve(self, src: Source) -> ServedVersion:
        return resolve_source(src, self._open_registry)

    def _load(self, src: Source, version: ServedVersion) -> Slot:
        from trustmoe.serve.chat import ChatTemplate
        from trustmoe.serve.state import ServerState

        try:
            engine = self._factory(version.model_dir, self.config.engine)
        except TrustmoeError:
            raise
        except (ValueError, OSError, RuntimeError) as e:
            raise TrustmoeError(f"cannot load {version.header} ({version.model_dir}): "
                                f"{type(e).__name__}: {e}") from None
        name = self.served_name or version.name
        if self.metrics_root is None:
            metrics = self._make_metrics(name, versioned=True, version=version.key,
                                         role=version.role)
            self.metrics_root = metrics
            metrics.canary_percent.set(self._canary_percent)
        else:
            metrics = self.metrics_root.for_version(version.key, version.role)
        state = ServerState(engine, model_name=name, served_names=[name, version.key],
                            max_concurrency=self.config.max_concurrency,
                            chat_template=ChatTemplate.from_model_dir(version.model_dir),
                            api_key=self.config.api_key, metrics=metrics,
                            admission=self.admission)
        state.guard = self.guard  # type: ignore[attr-defined]
        state.version = version  # type: ignore[attr-defined]
        slot = Slot(version, state)
        if self._slots:  # a swap: the server is running, so the new engine runs at once
            state.bridge.start()
        return slot

    def _retire(self, old: Slot) -> None:
        self._retiring.append(old)
        threading.Thread(target=self._drain, args=(old,), name="trustmoe-retire",
                         daemon=True).start()

    def _drain(self, old: Slot) -> None:
        deadline = time.monotonic() + RETIRE_TIMEOUT_S
        while (old.refs > 0 or old.state.bridge.in_flight > 0) and time.monotonic() < deadline:
            if self._stop.wait(0.02):
                break
        old.state.bridge.shutdown()
        with contextlib.suppress(ValueError):
            self._retiring.remove(old)
        old.state.release_engine()
        gc.collect()
        log.info("freed %s", old.version.header)

    def _follow(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            try:
                self.reload()
            except ReloadError as e:
                log.warning("%s", e)
            except Exception:  # the poller must outlive any surprise
                log.exception("alias poll failed")

    def _notify(self, fn: Callable[[Any], None], arg: Any) -> None:
        if self._notifier is None:
            self._notifier = threading.Thread(target=self._notify_loop, name="trustmoe-notify",
                                              daemon=True)
            self._notifier.start()
        self._notify_q.put((fn, arg))

    def _notify_loop(self) -> None:
        while True:
            item = self._notify_q.get()
            if item is None:
                return
            fn, arg = item
            try:
                fn(arg)
            except Exception:
                log.exception("fleet callback failed")

    def _publish_info(self) -> None:
        if self.metrics_root is not None:
            self.metrics_root.served(self.versions())
