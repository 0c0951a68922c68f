"""`monitor.toml`: what the monitor watches, when an alarm opens an incident, and what it does.

    [monitor]
    window = 100              # requests per window (tumbling, per model version)
    ert_requests = 10000      # mean requests between false alarms of each drift detector
    consecutive = 2           # windows in a row that make an alarm (each detector may override)
    cooldown_requests = 1000  # after an incident, that detector stays quiet this many requests
    cooldown_s = 600          # ... and this many seconds (both must pass)
    log_prompts = false       # keep raw prompts of sample requests in incidents
    sample_requests = 8       # hashed request ids kept per incident
    seed = 0

    [actions]
    act = ["hidden", "routing", "slo"]   # detectors whose incidents trigger `action`
    action = "rollback_canary"           # rollback_canary | rollback_production | notify
                                         # (every incident is stored and notified either way)
    [detectors.tokens]                   # also: scalars, hidden, routing
    enabled = true
    floor = 0.1                          # effect-size floor
    consecutive = 2
    bins = 20                            # tokens only; scalars: features = [...];
                                         # hidden: permutations = 200
    [slo]
    window = 200                         # requests per SLO window, per version
    p99_latency_s = 10.0                 # any limit left out is not checked
    p99_ttft_s = 2.0
    max_error_rate = 0.05
    max_guard_block_rate = 0.5
    consecutive = 1

    [notify]
    webhook = "https://hooks.example/trustmoe"
    timeout_s = 5.0
    retries = 3
    secret_env = "TRUSTMOE_WEBHOOK_SECRET"   # HMAC-SHA256 signature header when set

Unknown sections and keys are errors, not silently ignored (Flagger's thresholds were:
flagger#1815), and every value is checked for type and range.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustmoe.deploy.drift import DETECTORS, DetectorSpec
from trustmoe.eval.profile import SCALARS
from trustmoe.io import TrustmoeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ACTIONS = ("notify", "rollback_canary", "rollback_production")
SLO_LIMITS = ("p99_latency_s", "p99_ttft_s", "max_error_rate", "max_guard_block_rate")
SLO_DETECTORS = tuple(f"slo.{k}" for k in SLO_LIMITS)


@dataclass
class SLOPolicy:
    window: int = 200
    p99_latency_s: float | None = None
    p99_ttft_s: float | None = None
    max_error_rate: float | None = 0.05
    max_guard_block_rate: float | None = None
    consecutive: int = 1

    def limits(self) -> dict[str, float]:
        return {k: v for k in SLO_LIMITS if (v := getattr(self, k)) is not None}


@dataclass
class WebhookPolicy:
    url: str
    timeout_s: float = 5.0
    retries: int = 3
    secret_env: str | None = None


@dataclass
class Policy:
    window: int = 100
    ert_requests: float = 10000.0
    consecutive: int = 2
    cooldown_requests: int = 1000
    cooldown_s: float = 600.0
    log_prompts: bool = False
    sample_requests: int = 8
    seed: int = 0
    act: tuple[str, ...] = ()
    action: str = "notify"
    detectors: dict[str, DetectorSpec] = field(default_factory=dict)
    slo: SLOPolicy = field(default_factory=SLOPolicy)
    webhook: WebhookPolicy | None = None

    def __post_init__(self) -> None:
        for name in DETECTORS:
            self.detectors.setdefault(name, DetectorSpec(consecutive=self.consecutive))

    def may_act(self, detector: str) -> bool:
        """Whether an incident from `detector` triggers `action` ("slo"/"drift" name groups)."""
        group = "slo" if detector.startswith("slo.") else "drift"
        return detector in self.act or group in self.act or "*" in self.act

    def action_for(self, detector: str) -> str:
        return self.action if self.may_act(detector) else "notify"


class _Table:
    """Reads one TOML table, naming `where` and refusing unknown keys."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise TrustmoeError(f"{where} must be a table, got {type(data).__name__}")
        self.data, self.where = data, where
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, *, lo: float | None = None,
            hi: float | None = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        v = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise TrustmoeError(f"{self.where}.{key} must be {names}, got {v!r}")
        out_of_range = not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi) \
            if isinstance(v, int | float) and not isinstance(v, bool) else False
        if out_of_range:
            rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise TrustmoeError(f"{self.where}.{key} must be {rng}, got {v!r}")
        return v

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise TrustmoeError(f"{self.where}: unknown key(s) {extra} (misspelled? unknown keys are "
                                "refused so that no setting is silently ignored)")


def parse_policy(data: dict[str, Any], where: str = "monitor.toml") -> Policy:
    top = _Table(data, where)
    m = _Table(top.get("monitor", dict, {}), f"{where} [monitor]")
    num = (int, float)
    p = Policy(
        window=m.get("window", int, 100, lo=2, hi=1_000_000),
        ert_requests=float(m.get("ert_requests", num, 10000.0, lo=1)),
        consecutive=m.get("consecutive", int, 2, lo=1, hi=100),
        cooldown_requests=m.get("cooldown_requests", int, 1000, lo=0),
        cooldown_s=float(m.get("cooldown_s", num, 600.0, lo=0)),
        log_prompts=m.get("log_prompts", bool, False),
        sample_requests=m.get("sample_requests", int, 8, lo=0, hi=1000),
        seed=m.get("seed", int, 0, lo=0),
    )
    m.done()
    a = _Table(top.get("actions", dict, {}), f"{where} [actions]")
    act = a.get("act", list, [])
    known = (*DETECTORS, *SLO_DETECTORS, "slo", "drift", "*")
    for x in act:
        if x not in known:
            raise TrustmoeError(f"{where} [actions].act: unknown detector {x!r}; known: {list(known)}")
    p.act = tuple(act)
    p.action = a.get("action", str, "notify")
    if p.action not in ACTIONS:
        raise TrustmoeError(f"{where} [actions].action must be one of {list(ACTIONS)}, got {p.action!r}")
    a.done()
    dets = _Table(top.get("detectors", dict, {}), f"{where} [detectors]")
    for name in dets.data:
        if name not in DETECTORS:
            raise TrustmoeError(f"{where}: unknown detector [detectors.{name}]; known: {list(DETECTORS)}")
        p.detectors[name] = _detector(dets.get(name, dict, {}), f"{where} [detectors.{name}]", name, p.consecutive)
    dets.done()
    for name in DETECTORS:
        if name not in dets.data:
            p.detectors[name] = DetectorSpec(consecutive=p.consecutive)
    if p.ert_requests <= p.window * max(d.consecutive for d in p.detectors.values()):
        raise TrustmoeError(f"{where}: ert_requests ({p.ert_requests:g}) must exceed window x consecutive "
                            f"({p.window} x {max(d.consecutive for d in p.detectors.values())}): no false "
                            "alarm could come sooner than that anyway")
    s = _Table(top.get("slo", dict, {}), f"{where} [slo]")
    p.slo = SLOPolicy(
        window=s.get("window", int, 200, lo=1, hi=1_000_000),
        p99_latency_s=_opt(s.get("p99_latency_s", num, None, lo=0)),
        p99_ttft_s=_opt(s.get("p99_ttft_s", num, None, lo=0)),
        max_error_rate=_opt(s.get("max_error_rate", num, 0.05, lo=0, hi=1)),
        max_guard_block_rate=_opt(s.get("max_guard_block_rate", num, None, lo=0, hi=1)),
        consecutive=s.get("consecutive", int, 1, lo=1, hi=100))
    s.done()
    if "notify" in data:
        n = _Table(top.get("notify", dict, {}), f"{where} [notify]")
        url = n.get("webhook", str, None)
        if not url or not url.startswith(("http://", "https://")):
            raise TrustmoeError(f"{where} [notify].webhook must be an http(s) URL, got {url!r}")
        p.webhook = WebhookPolicy(url, float(n.get("timeout_s", num, 5.0, lo=0.01, hi=600)),
                                  n.get("retries", int, 3, lo=0, hi=20), n.get("secret_env", str, None))
        n.done()
    top.done()
    return p


def _opt(v: Any) -> float | None:
    return None if v is None else float(v)


def _detector(data: Any, where: str, name: str, consecutive: int) -> DetectorSpec:
    t = _Table(data, where)
    spec = DetectorSpec(enabled=t.get("enabled", bool, True),
                        floor=_opt(t.get("floor", (int, float), None, lo=0)),
                        consecutive=t.get("consecutive", int, consecutive, lo=1, hi=100))
    if name == "tokens":
        spec.options["bins"] = t.get("bins", int, 20, lo=2, hi=1000)
    elif name == "scalars":
        feats = t.get("features", list, list(SCALARS))
        bad = [f for f in feats if f not in SCALARS]
        if bad or not feats:
            raise TrustmoeError(f"{where}.features: unknown feature(s) {bad}; choose from {list(SCALARS)}")
        spec.options["features"] = list(feats)
    elif name == "hidden":
        spec.options["permutations"] = t.get("permutations", int, 200, lo=10, hi=100_000)
    t.done()
    return spec


def load_policy(path: Path | None) -> Policy:
    """The policy in `path`, or the defaults when None."""
    if path is None:
        return Policy()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TrustmoeError(f"policy file not found: {path}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TrustmoeError(f"{path} is not valid UTF-8 (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise TrustmoeError(f"{path} is malformed TOML: {e}") from None
    return parse_policy(data, str(path))
