"""The request-path guard: policy (`guard.toml`), input verdicts and output scanning.

    guard = Guard.from_toml("guard.toml")        # or Guard(GuardPolicy()) for the defaults
    v = guard.scan_input([ScanItem("user", text)])
    v.action, v.score, v.rule                     # "allow" | "flag" | "block"

Input: every item (user, system and tool messages, completion prompts) is normalized and
decoded (`decode.views`); rules (`rules.py`) and the classifier score every view. An item's
score is max(classifier, strongest rule); `tool` items use `tool_block`/`tool_flag`
thresholds (indirect injection is what tool output carries). The request gets the worst item.

Output (`OutputScanner`): secrets (KEY), PII (EMAIL, PHONE, ...) via `detectors.py`, and the
deployment's canary token. Streaming never lets text past a decision: the scanner holds back
any tail that could still grow into a finding, as the engine holds back stop strings.

guard.toml (every key optional; `trustmoe serve --guard guard.toml`):

    enabled = true
    model = "builtin"          # "builtin" | "none" (rules only) | path to a guard model dir
    max_scan_chars = 1000000   # longer input is refused (413) rather than scanned in part
    [input]
    block = 0.9                # score at or above: 400 guard_<rule>
    flag = 0.5                 # score at or above: allowed, X-Trustmoe-Guard: flag
    tool_block = 0.8
    tool_flag = 0.4
    roles = ["system", "user", "tool", "developer", "assistant"]
    [output]
    secrets = "redact"         # off | flag | redact | block
    pii = "off"
    canary = false             # true: a per-deployment token goes into the system prompt
    canary_token = ""          # fixed token (default: random at start-up)
    [tools]
    allow = []                 # tool names allowed; [] = any the request declares
    sensitive = []             # disabled for a turn that follows flagged tool output
    max_tools = 64
    max_schema_bytes = 32768
    max_schema_depth = 16
    max_calls = 8              # tool calls in one choice (parallel_tool_calls; false: 1)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trustmoe.io import TrustmoeError
from trustmoe.security import detectors, rules
from trustmoe.security.decode import views

ACTIONS = ("off", "flag", "redact", "block")
BUILTIN_MODEL = Path(__file__).parent / "guard_model"
ROLES = ("system", "user", "tool", "developer", "assistant")


@dataclass(frozen=True)
class ToolPolicyConfig:
    allow: tuple[str, ...] = ()
    sensitive: tuple[str, ...] = ()
    max_tools: int = 64
    max_schema_bytes: int = 32768
    max_schema_depth: int = 16
    max_calls: int = 8  # tool calls per choice when the request allows parallel calls


@dataclass(frozen=True)
class GuardPolicy:
    enabled: bool = True
    model: str = "builtin"
    max_scan_chars: int = 1_000_000
    block: float = 0.9
    flag: float = 0.5
    tool_block: float = 0.8
    tool_flag: float = 0.4
    roles: tuple[str, ...] = ROLES
    secrets: str = "redact"
    pii: str = "off"
    canary: bool = False
    canary_token: str = ""
    tools: ToolPolicyConfig = field(default_factory=ToolPolicyConfig)

    def validate(self) -> GuardPolicy:
        for name in ("block", "flag", "tool_block", "tool_flag"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise TrustmoeError(f"guard policy: {name} must be in (0, 1], got {v}")
        if self.flag > self.block or self.tool_flag > self.tool_block:
            raise TrustmoeError("guard policy: a flag threshold must not exceed its block threshold")
        for name in ("secrets", "pii"):
            if getattr(self, name) not in ACTIONS:
                raise TrustmoeError(f"guard policy: output.{name} must be one of {', '.join(ACTIONS)}")
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise TrustmoeError(f"guard policy: unknown role {bad[0]!r} in input.roles")
        if self.max_scan_chars < 1000:
            raise TrustmoeError("guard policy: max_scan_chars must be at least 1000")
        t = self.tools
        if t.max_tools < 1 or t.max_schema_bytes < 64 or not 1 <= t.max_schema_depth <= 64:
            raise TrustmoeError("guard policy: tools limits must be positive (max_schema_depth 1..64)")
        if not 1 <= t.max_calls <= 64:
            raise TrustmoeError(f"guard policy: tools.max_calls must be in 1..64, got {t.max_calls}")
        return self


_SECTIONS: dict[str, dict[str, str]] = {
    "": {"enabled": "enabled", "model": "model", "max_scan_chars": "max_scan_chars"},
    "input": {"block": "block", "flag": "flag", "tool_block": "tool_block", "tool_flag": "tool_flag",
              "roles": "roles"},
    "output": {"secrets": "secrets", "pii": "pii", "canary": "canary", "canary_token": "canary_token"},
}


def _typed(where: str, value: Any, like: Any) -> Any:
    if isinstance(like, bool):
        ok = isinstance(value, bool)
    elif isinstance(like, int | float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = type(like)(value) if ok else value
    elif isinstance(like, tuple):
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise TrustmoeError(f"guard.toml: {where} has the wrong type ({type(value).__name__})")
    return value


def policy_from_dict(d: dict[str, Any], source: str = "guard.toml") -> GuardPolicy:
    """A validated policy; unknown keys and wrong types are one clear error each."""
    kw: dict[str, Any] = {}
    defaults = GuardPolicy()
    tools_kw: dict[str, Any] = {}
    for key, value in d.items():
        if key in ("input", "output", "tools"):
            if not isinstance(value, dict):
                raise TrustmoeError(f"{source}: [{key}] must be a table")
            for k, v in value.items():
                if key == "tools":
                    names = {f.name for f in fields(ToolPolicyConfig)}
                    if k not in names:
                        raise TrustmoeError(f"{source}: unknown key tools.{k}")
                    tools_kw[k] = _typed(f"tools.{k}", v, getattr(ToolPolicyConfig(), k))
                elif k in _SECTIONS[key]:
                    kw[k] = _typed(f"{key}.{k}", v, getattr(defaults, k))
                else:
                    raise TrustmoeError(f"{source}: unknown key {key}.{k}")
        elif key in _SECTIONS[""]:
            kw[key] = _typed(key, value, getattr(defaults, key))
        else:
            raise TrustmoeError(f"{source}: unknown key {key!r}")
    if tools_kw:
        kw["tools"] = ToolPolicyConfig(**tools_kw)
    return GuardPolicy(**kw).validate()


def load_policy(path: str | Path) -> GuardPolicy:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrustmoeError(f"guard policy not found: {p}") from None
    except UnicodeDecodeError:
        raise TrustmoeError(f"guard policy is not valid UTF-8: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise TrustmoeError(f"guard policy {p} is malformed TOML: {e}") from None
    return policy_from_dict(data, str(p))


@dataclass(frozen=True)
class ScanItem:
    role: str  # system | user | tool | developer | assistant | prompt
    text: str
    where: str = ""  # e.g. "messages[2]"


@dataclass
class Verdict:
    action: str  # allow | flag | block
    score: float
    rule: str | None  # the deciding rule ("classifier" when the model decided), None if clean
    where: str = ""
    hits: list[rules.RuleHit] = field(default_factory=list)
    tool_flagged: bool = False  # a tool message scored at or above tool_flag

    @property
    def code(self) -> str:
        return f"guard_{self.rule or 'blocked'}"


class Guard:
    def __init__(self, policy: GuardPolicy | None = None, classifier: Any = None) -> None:
        self.policy = (policy or GuardPolicy()).validate()
        self.classifier = classifier
        if classifier is None and self.policy.enabled and self.policy.model != "none":
            from trustmoe.security.classifier import GuardClassifier

            path = BUILTIN_MODEL if self.policy.model == "builtin" else Path(self.policy.model)
            self.classifier = GuardClassifier.load(path)
        self.canary = (self.policy.canary_token or f"tm-canary-{secrets.token_hex(8)}"
                       if self.policy.canary else "")

    @classmethod
    def from_toml(cls, path: str | Path | None) -> Guard:
        return cls(load_policy(path) if path else GuardPolicy())

    def score_text(self, text: str) -> tuple[float, str | None, list[rules.RuleHit]]:
        """(score, deciding rule, rule hits) of one text."""
        v = views(text)
        hits = rules.scan(v.normalized) + rules.signal_hits(v.signals)
        for how, t in v.decoded:
            hits += rules.scan(t, how)
        best_rule = max(hits, key=lambda h: h.weight, default=None)
        clf = max((self.classifier.score(t) for t in v.texts()), default=0.0) if self.classifier else 0.0
        if best_rule is not None and best_rule.weight >= clf:
            return best_rule.weight, best_rule.rule, hits
        return clf, ("classifier" if clf > 0 else None), hits

    def scan_input(self, items: list[ScanItem]) -> Verdict:
        """The request's verdict: its worst item against the policy thresholds."""
        p = self.policy
        worst = Verdict("allow", 0.0, None)
        if not p.enabled:
            return worst
        rank = {"allow": 0, "flag": 1, "block": 2}
        tool_flagged = False
        for it in items:
            if it.role not in p.roles and it.role != "prompt":
                continue
            if len(it.text) > p.max_scan_chars:
                return Verdict("block", 1.0, "too_long", it.where)
            score, rule, hits = self.score_text(it.text)
            block, flag = (p.tool_block, p.tool_flag) if it.role == "tool" else (p.block, p.flag)
            action = "block" if score >= block else "flag" if score >= flag else "allow"
            if it.role == "tool" and action != "allow":
                tool_flagged = True
            if (rank[action], score) > (rank[worst.action], worst.score):
                worst = Verdict(action, score, rule if action != "allow" else None, it.where, hits)
        worst.tool_flagged = tool_flagged
        return worst

    def output_scanner(self) -> OutputScanner:
        return OutputScanner(self)


@dataclass
class OutputEvent:
    rule: str  # secret | pii | canary_leak
    action: str  # flag | redact | block


class OutputScanner:
    """Feed generated text as it comes; get back what is safe to send (redacted as the
    policy says), holding back any tail that could still become a finding. `blocked` is set
    (and nothing more is released) once a `block` rule fires."""

    HOLD = 64  # characters of trailing token-like text kept back

    def __init__(self, guard: Guard) -> None:
        p = guard.policy
        self.canary = guard.canary
        self.modes = {"KEY": p.secrets}
        for t in ("EMAIL", "IP_ADDRESS", "PHONE", "CREDIT_CARD", "IBAN"):
            self.modes[t] = p.pii
        self.active = p.enabled and (bool(self.canary) or any(m != "off" for m in self.modes.values()))
        self.text = ""
        self.done = 0  # raw characters already released
        self.blocked = False
        self.events: list[OutputEvent] = []

    def _boundary(self, final: bool) -> int:
        if final:
            return len(self.text)
        t = self.text
        end = len(t)
        i = end
        while i > 0 and end - i < 4096 and not t[i - 1].isspace():
            i -= 1  # the trailing word may still grow into a key, an email, a card number
        cut = i
        pem = t.rfind("-----BEGIN", max(0, self.done - 64))
        if pem >= 0 and t.find("-----END", pem) < 0:
            cut = min(cut, pem)
        if self.canary:
            for n in range(min(len(self.canary) - 1, end), 0, -1):
                if t.endswith(self.canary[:n]):
                    cut = min(cut, end - n)
                    break
        return max(cut, self.done)

    def feed(self, delta: str, final: bool = False) -> str:
        """Append `delta`; return the newly releasable (possibly redacted) text."""
        if self.blocked:
            return ""
        self.text += delta
        if not self.active:
            out, self.done = self.text[self.done:], len(self.text)
            return out
        if self.canary and self.canary in self.text[max(0, self.done - len(self.canary)):]:
            self.blocked = True
            self.events.append(OutputEvent("canary_leak", "block"))
            return ""
        upto = self._boundary(final)
        start = max(0, self.done - 256)
        found = [f for f in detectors.find(self.text[start:upto]) if self.modes.get(f.type, "off") != "off"]
        parts: list[str] = []
        pos = self.done
        for f in found:
            a, b = f.start + start, f.end + start
            if b <= self.done:
                continue
            mode = self.modes[f.type]
            rule = "secret" if f.type == "KEY" else "pii"
            self.events.append(OutputEvent(rule, mode))
            if mode == "block":
                self.blocked = True
                return ""
            if mode == "redact":
                a = max(a, pos)
                parts.append(self.text[pos:a])
                parts.append(detectors.PLACEHOLDERS[f.type])
                pos = b
        parts.append(self.text[pos:upto])
        self.done = upto
        return "".join(parts)

    def finish(self) -> str:
        return self.feed("", final=True)
