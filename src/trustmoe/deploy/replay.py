"""Offline replay: a JSONL of requests -> model features -> the monitor -> the incidents it would open.

Each line is an object with either `"prompt": "..."` or chat `"messages": [{"role", "content"}]`,
and optionally what a server log holds: `"id"`, `"time"` (unix seconds), `"latency_s"`,
`"ttft_s"`, `"error"`, `"guard_blocked"`. Prompts are tokenized as the engine does (no special
tokens added); prompts the server would refuse (empty, longer than the model's context) are
skipped and listed by line number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmoe.deploy.incidents import Incident, IncidentSink, MemorySink
from trustmoe.deploy.monitor import Monitor, RequestRecord, VersionInfo
from trustmoe.deploy.policy import Policy
from trustmoe.engine.features import features_from_model
from trustmoe.eval.profile import Profile
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trustmoe.model.transformer import Transformer

ChatRenderer = Callable[[list[dict[str, Any]]], str]
_OPTIONAL: dict[str, tuple[type, ...]] = {"id": (str, int), "time": (int, float), "latency_s": (int, float),
                                          "ttft_s": (int, float), "error": (bool,), "guard_blocked": (bool,)}


@dataclass
class LoggedRequest:
    line: int
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


def read_requests(path: Path, render_chat: ChatRenderer | None = None) -> list[LoggedRequest]:
    """Parse the JSONL; any bad line raises TrustmoeError naming `path:line`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TrustmoeError(f"requests file not found: {path}") from None
    except IsADirectoryError:
        raise TrustmoeError(f"{path} is a directory, not a JSONL file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TrustmoeError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    out = []
    for n, line_text in enumerate(text.splitlines(), 1):
        if not line_text.strip():
            continue
        try:
            obj = json.loads(line_text)
        except json.JSONDecodeError as e:
            raise TrustmoeError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        out.append(_parse(obj, f"{path}:{n}", n, render_chat))
    if not out:
        raise TrustmoeError(f"{path} holds no requests")
    return out


def _parse(obj: Any, where: str, n: int, render_chat: ChatRenderer | None) -> LoggedRequest:
    if not isinstance(obj, dict):
        raise TrustmoeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("prompt"), str):
        text = obj["prompt"]
    elif "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise TrustmoeError(f'{where}: "messages" must be a non-empty list of objects with string '
                                '"role" and "content"')
        if render_chat is None:
            raise TrustmoeError(f"{where}: chat messages need a chat template")
        try:
            text = render_chat(msgs)
        except Exception as e:  # the template's own error, told with the line number
            raise TrustmoeError(f"{where}: {getattr(e, 'message', None) or e}") from None
    else:
        raise TrustmoeError(f'{where}: expected a string "prompt" or a "messages" list')
    fields = {}
    for k, kinds in _OPTIONAL.items():
        if k in obj and obj[k] is not None:
            v = obj[k]
            if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds) \
                    or (isinstance(v, float) and not math.isfinite(v)):
                raise TrustmoeError(f"{where}: field {k!r} has the wrong type or value: {v!r}")
            fields[k] = v
    return LoggedRequest(n, text, fields)


@dataclass
class ReplayReport:
    requests: int
    scored: int
    skipped: list[dict[str, Any]]
    incidents: list[Incident]
    status: dict[str, Any]
    explain: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "scored": self.scored, "skipped": self.skipped,
                "incidents": [i.to_dict() for i in self.incidents], "explain": self.explain,
                "status": self.status}


def replay(reqs: list[LoggedRequest], model: Transformer, tokenizer: Tokenizer, profile: Profile,
           policy: Policy, info: VersionInfo, *, sink: IncidentSink | None = None, batch_size: int = 16,
           on_progress: Callable[[int], None] | None = None, chunk: int = 64) -> ReplayReport:
    max_pos = model.config.max_position_embeddings
    ids, skipped = [], []
    for r in reqs:
        toks = list(tokenizer.encode(r.text, add_special_tokens=False).ids)
        if not toks:
            skipped.append({"line": r.line, "reason": "empty prompt"})
        elif len(toks) > max_pos:
            skipped.append({"line": r.line, "reason": f"{len(toks)} tokens; the model takes {max_pos}"})
        ids.append(toks)
    now = [0.0]
    mon = Monitor(policy, sink=sink if sink is not None else MemorySink(), clock=lambda: now[0])
    try:
        mon.add_version(info, profile)
    except ValueError as e:
        raise TrustmoeError(f"cannot monitor against this profile: {e}") from None
    keep = [i for i, t in enumerate(ids) if 1 <= len(t) <= max_pos]
    opened: list[Incident] = []
    scored = 0
    for c0 in range(0, len(keep), chunk):
        part = keep[c0:c0 + chunk]
        feats = features_from_model(model, [ids[i] for i in part], batch_size=batch_size)
        for i, f in zip(part, feats, strict=True):
            r = reqs[i]
            t = float(r.fields.get("time", r.line))
            now[0] = t
            blocked = bool(r.fields.get("guard_blocked", False))
            err = bool(r.fields.get("error", False))
            rec = RequestRecord(str(r.fields.get("id", f"line:{r.line}")), info.version, t,
                                r.fields.get("latency_s"), r.fields.get("ttft_s"), err, blocked,
                                None if blocked or err else f, r.text)
            try:
                opened += mon.observe(rec)
            except ValueError as e:
                raise TrustmoeError(f"line {r.line}: features do not fit the profile: {e}") from None
            scored += 0 if blocked or err else 1
        if on_progress is not None:
            on_progress(len(part))
    return ReplayReport(len(reqs), scored, skipped, opened, mon.status(), mon.explain(info.version))
