"""Turning sampled tokens into text deltas, stop decisions and `RequestOutput`s.

Detokenization is incremental (decode a short window of ids, as vLLM does) so a step costs
the same at token 10 and token 1000, and text is held back while it ends in an incomplete
UTF-8 sequence or could still be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trustmoe.engine.features import RequestFeatures
from trustmoe.engine.sampling import TokenLogprob, prompt_logprob_values
from trustmoe.engine.scheduler import Sequence


@dataclass
class RequestOutput:
    """What one engine step says about one request: its new tokens and text, and the totals."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[float | None] | None
    num_cached_prompt_tokens: int
    arrival_time: float
    first_token_time: float | None
    # with prompt_logprobs = k > 0: per prompt position (first: None), its top-k alternatives
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    # with SamplingParams.prompt_logits: (P-1, V) fp32 raw logits, row i predicts prompt token i+1
    prompt_logits: torch.Tensor | None = None
    # with EngineConfig.features: the prompt's monitoring features, on the finished output
    features: RequestFeatures | None = None


def top_alternatives(logits: torch.Tensor, k: int) -> list[dict[int, float] | None]:
    """logits (N, V) -> per row, the k most likely token ids and their log-softmax values."""
    if logits.shape[0] == 0:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    tv, ti = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (N, k)
    return [{int(t): float(v) for t, v in zip(ids, vs, strict=True)}
            for ids, vs in zip(ti.tolist(), tv.tolist(), strict=True)]


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class OutputBuilder:
    """Text deltas and stop decisions; needs only the engine's detokenizer, EOS id and context."""

    def __init__(self, decode: Callable[[list[int]], str], eos_token_id: int | None,
                 max_model_len: int) -> None:
        self.decode, self.eos_token_id, self.max_model_len = decode, eos_token_id, max_model_len
        self._logits: dict[str, list[torch.Tensor]] = {}  # request id -> prompt logit rows

    def add_prompt_logprobs(self, s: Sequence, start: int, logits: torch.Tensor) -> None:
        """Score the prompt tokens after this chunk's positions and, when the request asks for
        k > 0, keep each position's top-k alternatives. logits: (T, V) at prompt positions
        start..start+T-1; row j predicts prompt token start+j+1."""
        T = logits.shape[0]
        if s.prompt_logprobs is None:
            s.prompt_logprobs = [None]
        window = s.prompt_ids[start: start + T + 1]
        vals = prompt_logprob_values(logits[: len(window)], window)
        s.prompt_logprobs.extend(vals[1:])
        if s.params.prompt_logits and len(window) > 1:
            self._logits.setdefault(s.request_id, []).append(logits[: len(window) - 1].float())
        k = s.params.prompt_logprobs or 0
        if k > 0:
            if s.prompt_top_logprobs is None:
                s.prompt_top_logprobs = [None]
            s.prompt_top_logprobs.extend(top_alternatives(logits[: len(window) - 1], k))

    def update_text(self, s: Sequence, token: int) -> None:
        """Append `token`'s text, then decide whether the sequence is finished."""
        p = s.params
        special = (token == self.eos_token_id and not p.ignore_eos) or (
            p.stop_token_ids is not None and token in p.stop_token_ids)
        if special:
            s.finished, s.finish_reason = True, "stop"
            self._flush(s, exclude_last=True)
            return
        ids = s.output_ids
        prefix = self.decode(ids[s.prefix_offset: s.read_offset])
        full = self.decode(ids[s.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            old = len(s.text)
            s.text += full[len(prefix):]
            s.prefix_offset, s.read_offset = s.read_offset, len(ids)
            if p.stop:
                longest = max(len(x) for x in p.stop)
                window_start = max(0, old - longest + 1)
                hits = [i for i in (s.text.find(x, window_start) for x in p.stop) if i >= 0]
                if hits:
                    s.text = s.text[: min(hits)]
                    s.finished, s.finish_reason = True, "stop"
                    return
        if len(ids) >= p.max_tokens or len(s.prompt_ids) + len(ids) >= self.max_model_len:
            s.finished, s.finish_reason = True, "length"
            self._flush(s, exclude_last=False)

    def _flush(self, s: Sequence, exclude_last: bool) -> None:
        """At the end, decode whatever is still pending (e.g. an incomplete UTF-8 tail)."""
        ids = s.output_ids[:-1] if exclude_last else s.output_ids
        if s.read_offset < len(ids):
            prefix = self.decode(ids[s.prefix_offset: s.read_offset])
            full = self.decode(ids[s.prefix_offset:])
            s.text += full[len(prefix):]
            s.read_offset = len(ids)
        if s.params.stop:
            hits = [i for i in (s.text.find(x) for x in s.params.stop) if i >= 0]
            if hits:
                s.text = s.text[: min(hits)]
                s.finish_reason = "stop"

    def make(self, s: Sequence, new_ids: list[int], finished: bool) -> RequestOutput:
        end = len(s.text)
        if not finished and s.params.stop:
            end -= held_back(s.text, s.params.stop)
        end = max(end, s.sent)
        delta = s.text[s.sent:end]
        s.sent = end
        plp = ptop = plog = None
        if s.prompt_logprobs is not None and not s.prompt_logprobs_sent:
            plp = s.prompt_logprobs[: len(s.prompt_ids)]
            if s.prompt_top_logprobs is not None:
                ptop = s.prompt_top_logprobs[: len(s.prompt_ids)]
            rows = self._logits.pop(s.request_id, None)
            if rows is not None:
                plog = torch.cat(rows)  # (P-1, V): row i predicts prompt token i+1
            s.prompt_logprobs_sent = True
        if finished:
            self._logits.pop(s.request_id, None)
        lps, s.new_logprobs = s.new_logprobs, []
        return RequestOutput(
            request_id=s.request_id, prompt_token_ids=s.prompt_ids, new_token_ids=list(new_ids),
            new_text=delta, token_ids=list(s.output_ids), text=s.text[:end], finished=finished,
            finish_reason=s.finish_reason if finished else None, logprobs=lps,
            prompt_logprobs=plp, num_cached_prompt_tokens=s.num_cached_prompt,
            arrival_time=s.arrival_time, first_token_time=s.first_token_time,
            prompt_top_logprobs=ptop, prompt_logits=plog,
        )
