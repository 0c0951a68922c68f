"""One HTTP request's life as the fleet sees it: the engine it ran on, its outcome, its tokens.

The route makes a `RequestTracker` once it knows which slot answers, and sets it as the
current tracker (a context variable, so `ServerState.admit` finds it without the handlers
knowing). The tracker then sees every output of the request's lease and ends exactly once:

- a plain JSON response or an error: when the route returns or raises (its HTTP status);
- a streamed response: when its lease closes — 200 when every choice finished, 499 when the
  client went away first, 500 when generation failed mid-stream.

Ending releases the slot (a retiring engine is freed after its last request), counts
`trustmoe:requests{version, role, status}`, hands a `FinishedRequest` to the fleet (its
callbacks run on a background thread) and, for a request sampled for shadowing that ended
with 200, the primary's tokens and log-probabilities to the shadow runner.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trustmoe.engine import RequestOutput
    from trustmoe.serve.fleet import Fleet, Slot
    from trustmoe.serve.state import Lease

CURRENT_TRACKER: ContextVar[RequestTracker | None] = ContextVar("trustmoe_tracker", default=None)


@dataclass
class ChoiceRecord:
    """What the primary produced for one choice (kept only for requests copied to a shadow)."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # primary's log p(token), raw logits
    finished: bool = False


@dataclass
class RequestTracker:
    fleet: Fleet
    slot: Slot
    endpoint: str
    user_hash: str | None
    request_id: str
    shadow: bool = False  # copy this request to the shadow when it ends well
    start: float = field(default_factory=time.monotonic)
    lease: Lease | None = None
    streaming: bool = False
    error_status: int | None = None
    first_token: float | None = None
    completion_tokens: int = 0
    guard_blocked: bool = False
    features: Any | None = None
    choices: dict[str, ChoiceRecord] = field(default_factory=dict)
    done: bool = False

    def attach(self, lease: Lease) -> None:
        """Called by `ServerState.admit`: watch this lease; a shadowed request asks the primary
        for its chosen tokens' log-probabilities (sampling and the answer are unchanged)."""
        self.lease = lease
        for s in lease.subs:
            if self.shadow:
                if s.params.logprobs is None:
                    s.params.logprobs = 0
                self.choices[s.request_id] = ChoiceRecord(s.index, list(s.prompt_ids))

    def observe(self, o: RequestOutput) -> None:
        if o.new_token_ids:
            if self.first_token is None:
                self.first_token = time.monotonic()
            self.completion_tokens += len(o.new_token_ids)
        feats = getattr(o, "features", None)
        if feats is not None and self.features is None:
            self.features = feats
        rec = self.choices.get(o.request_id)
        if rec is not None:
            rec.token_ids.extend(o.new_token_ids)
            rec.logprobs.extend(lp.logprob for lp in o.logprobs)
            rec.finished = rec.finished or o.finished

    def lease_closed(self, complete: bool) -> None:
        if self.streaming:
            self.finish(self.error_status or (200 if complete else 499))

    def prompt_tokens(self) -> int:
        if self.lease is None:
            return 0
        seen: set[int] = set()
        n = 0
        for s in self.lease.subs:  # a prompt shared by n choices counts once
            if id(s.prompt_ids) not in seen:
                seen.add(id(s.prompt_ids))
                n += len(s.prompt_ids)
        return n

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        from trustmoe.serve.fleet import FinishedRequest

        self.slot.release()
        now = time.monotonic()
        v = self.slot.version
        metrics = self.slot.state.metrics
        metrics.request(status)
        fr = FinishedRequest(
            version=v, request_id=self.request_id, status=status, latency_s=now - self.start,
            ttft_s=None if self.first_token is None else self.first_token - self.start,
            prompt_tokens=self.prompt_tokens(), completion_tokens=self.completion_tokens,
            guard_blocked=self.guard_blocked, user_hash=self.user_hash, features=self.features,
            endpoint=self.endpoint, finished_at=time.time())
        self.fleet.finished(fr)
        if self.shadow and status == 200 and self.choices:
            self.fleet.shadow_copy(self, fr)
