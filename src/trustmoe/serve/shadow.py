"""Shadow serving: copy a sampled share of requests to a second engine and compare, pairwise.

The user's answer never waits for the shadow and never changes: the copy is made after the
primary's request has ended (status 200), runs on the shadow's own engine and bridge (outside
the server's concurrency limit), and its output is discarded. When more than
`shadow_max_pending` copies are queued, a new one is skipped (counted), never waited for.

What is compared, per choice (one JSONL line and one set of observations each):

- **greedy token agreement**: teacher-forced. The shadow is fed the primary's prompt and then,
  step by step, exactly the tokens the primary produced (a logits processor forces each one, so
  the shadow decodes the same sequence at the same pace). At every completion position t the
  shadow's *raw* (unprocessed, temperature-free) logits give its own greedy choice
  argmax_v z_t[v]; agreement = the share of the primary's N completion positions where that
  argmax equals the primary's token y_t. For a greedily decoded primary this is the share of
  positions where both models pick the same next token given the same past.
- **mean NLL difference**: (1/N) sum_t [-log p_shadow(y_t | past)] - (1/N) sum_t
  [-log p_primary(y_t | past)], both from raw logits (log-softmax, T=1), in nats per token.
  Negative: the shadow finds the primary's answer likelier than the primary itself does.
- **latency**: the primary request's latency (arrival to last token, as the client saw it) and
  the shadow's (submission to its last forced token: prefill plus N decode steps of the same
  tokens) and their difference; also both times to first token.

Prometheus (server's registry): `trustmoe:shadow_token_agreement`,
`trustmoe:shadow_nll_difference`, `trustmoe:shadow_latency_seconds{role="primary"|"shadow"}`,
`trustmoe:shadow_comparisons{outcome="compared"|"skipped"|"failed"}`; every series carries the
primary and shadow versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import Counter, Histogram

from trustmoe.engine import SamplingParams

if TYPE_CHECKING:
    from trustmoe.engine import RequestOutput
    from trustmoe.serve.fleet import FinishedRequest, Fleet
    from trustmoe.serve.tracking import ChoiceRecord, RequestTracker

log = logging.getLogger("trustmoe.serve")

AGREEMENT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
NLL_BUCKETS = (-4.0, -2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ForceTokens:
    """A logits processor that makes the engine emit `tokens` in order (teacher forcing)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        # logits: (V,) one row; returns (V,) with every entry but the forced token at -inf
        t = self.tokens[min(len(generated), len(self.tokens) - 1)]
        out = torch.full_like(logits, -math.inf)
        out[t] = 0.0
        return out


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of the primary and the shadow on one choice."""

    request_id: str
    choice: int
    primary: str  # version key
    shadow: str
    tokens: int  # N, completion positions compared
    agreement: float  # share of positions where the shadow's argmax equals the primary's token
    primary_nll: float  # mean -log p_primary(y_t), nats
    shadow_nll: float  # mean -log p_shadow(y_t), nats
    nll_difference: float  # shadow_nll - primary_nll
    primary_latency_s: float
    shadow_latency_s: float
    primary_ttft_s: float | None
    shadow_ttft_s: float | None
    at: float  # time.time()


def compare(tokens: list[int], primary_logprobs: list[float], shadow_argmax: list[int],
            shadow_logprobs: list[float]) -> tuple[float, float, float]:
    """(agreement, primary mean NLL, shadow mean NLL) over the N positions all four cover."""
    n = min(len(tokens), len(primary_logprobs), len(shadow_argmax), len(shadow_logprobs))
    if n == 0:
        raise ValueError("nothing to compare: no completion tokens")
    agree = sum(int(a == y) for a, y in zip(shadow_argmax[:n], tokens[:n], strict=True)) / n
    return agree, -sum(primary_logprobs[:n]) / n, -sum(shadow_logprobs[:n]) / n


class ShadowRunner:
    def __init__(self, fleet: Fleet, percent: float, log_path: Path | None, max_pending: int,
                 registry: Any) -> None:
        self.fleet, self.percent, self.log_path, self.max_pending = fleet, percent, log_path, max_pending
        self.pending = 0
        self._rng = random.Random()
        self._log_lock = threading.Lock()
        lab = ["primary", "shadow"]
        self.agreement = Histogram("trustmoe:shadow_token_agreement",
                                   "Teacher-forced greedy token agreement of the shadow with the "
                                   "primary's answer, per choice (0..1).", lab,
                                   buckets=AGREEMENT_BUCKETS, registry=registry)
        self.nll_diff = Histogram("trustmoe:shadow_nll_difference",
                                  "Shadow minus primary mean NLL of the primary's tokens (nats).",
                                  lab, buckets=NLL_BUCKETS, registry=registry)
        self.latency = Histogram("trustmoe:shadow_latency_seconds",
                                 "Latency of the paired requests (role: primary or shadow).",
                                 [*lab, "role"], buckets=LATENCY_BUCKETS, registry=registry)
        self.outcomes = Counter("trustmoe:shadow_comparisons",
                                "Shadow copies by outcome (compared, skipped, failed).",
                                ["outcome"], registry=registry)
        for o in ("compared", "skipped", "failed"):
            self.outcomes.labels(o)

    def sample(self) -> bool:
        return self.percent > 0 and self._rng.random() * 100.0 < self.percent

    def submit(self, tracker: RequestTracker, fr: FinishedRequest) -> None:
        """Queue the copy (event-loop thread); skip it when too many are pending."""
        if self.pending >= self.max_pending or self.fleet.slot("shadow") is None:
            self.outcomes.labels("skipped").inc()
            return
        self.pending += 1
        task = asyncio.get_running_loop().create_task(self._run(tracker, fr))
        task.add_done_callback(lambda _t: self._done())

    def _done(self) -> None:
        self.pending -= 1

    async def _run(self, tracker: RequestTracker, fr: FinishedRequest) -> None:
        for rec in tracker.choices.values():
            if not rec.token_ids or not rec.finished:
                continue
            try:
                c = await self._one(tracker, fr, rec)
            except Exception as e:
                log.warning("shadow copy of %s failed: %s: %s", fr.request_id, type(e).__name__, e)
                self.outcomes.labels("failed").inc()
                continue
            if c is not None:
                self._record(c)
                if self.log_path is not None:  # file I/O off the event loop
                    await asyncio.to_thread(self._write, c)

    async def _one(self, tracker: RequestTracker, fr: FinishedRequest, rec: ChoiceRecord
                   ) -> Comparison | None:
        slot = self.fleet.hold("shadow")
        if slot is None:
            return None
        rid = f"shadow-{fr.request_id}-{rec.index}"
        out: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        params = SamplingParams(max_tokens=len(rec.token_ids), temperature=0.0, logprobs=1,
                                ignore_eos=True, logits_processors=[ForceTokens(rec.token_ids)])
        t0 = time.monotonic()
        first: float | None = None
        argmax: list[int] = []
        lps: list[float] = []
        finished = False
        try:
            await slot.state.bridge.add(rid, rec.prompt_ids, params, out, arrival=t0)
            while not finished:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                if item.new_token_ids and first is None:
                    first = time.monotonic()
                for lp in item.logprobs:  # raw log-softmax: the chosen (forced) token, top-1
                    lps.append(lp.logprob)
                    argmax.append(max(lp.top, key=lp.top.__getitem__) if lp.top else -1)
                finished = item.finished
        finally:
            if not finished:
                slot.state.bridge.abort(rid)
            slot.release()
        end = time.monotonic()
        agree, p_nll, s_nll = compare(rec.token_ids, rec.logprobs, argmax, lps)
        return Comparison(
            fr.request_id, rec.index, fr.version.key, slot.version.key, len(rec.token_ids), agree,
            p_nll, s_nll, s_nll - p_nll, fr.latency_s, end - t0, fr.ttft_s,
            None if first is None else first - t0, time.time())

    def _record(self, c: Comparison) -> None:
        lab = (c.primary, c.shadow)
        self.outcomes.labels("compared").inc()
        self.agreement.labels(*lab).observe(c.agreement)
        self.nll_diff.labels(*lab).observe(c.nll_difference)
        self.latency.labels(*lab, "primary").observe(c.primary_latency_s)
        self.latency.labels(*lab, "shadow").observe(c.shadow_latency_s)

    def _write(self, c: Comparison) -> None:
        assert self.log_path is not None
        line = json.dumps(asdict(c), sort_keys=True) + "\n"
        with self._log_lock:
            try:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(line)
            except OSError as e:
                log.warning("cannot write the shadow log %s: %s", self.log_path, e.strerror)
