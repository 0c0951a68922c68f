"""Sampling parameters and the per-step sampler.

Each request carries its own `SamplingParams`; a request with a `seed` owns a private
`torch.Generator`, so the same seed gives the same text whether it runs alone or batched
(the logits themselves are batch-invariant, see `runner.py`). Greedy rows take one batched
argmax; other rows go through penalties -> logits processors -> temperature -> top-k ->
top-p -> min-p -> multinomial. Log-probabilities are those of the raw model distribution
(before penalties and temperature), as OpenAI-style servers report them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16

LogitsProcessor = Callable[[list[int], Tensor], Tensor]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # per-request generator: same seed -> same text, alone or batched
    stop: list[str] | None = None  # stop strings (not included in the text)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: chosen token's logprob; k>0: also top-k
    prompt_logprobs: int | None = None  # for OpenAI `echo` + logprobs
    # with prompt_logprobs set: also return the raw (P-1, V) prompt logits (for evaluation)
    prompt_logits: bool = False
    # with prompt_logprobs set: score only prompt tokens from this index on (>= 1); the rows
    # before it are neither computed nor returned, and the positions before index - 1 may come
    # from the prefix cache (scoring a continuation after a shared context). None: all of them
    prompt_logits_from: int | None = None
    logits_processors: list[LogitsProcessor] | None = None

    def validate(self, max_model_len: int) -> None:
        """Raise ValueError with one clear message for values that cannot work."""
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            bad(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 0:
            bad(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.max_tokens > max_model_len:
            bad(f"max_tokens ({self.max_tokens}) exceeds the model context ({max_model_len})")
        for name, lo, hi in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0),
                             ("min_p", 0.0, 1.0), ("presence_penalty", -2.0, 2.0),
                             ("frequency_penalty", -2.0, 2.0),
                             ("repetition_penalty", 0.0, 10.0)):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
            if not lo <= v <= hi:
                bad(f"{name} must be in [{lo}, {hi}], got {v}")
        if self.top_p <= 0.0:
            bad(f"top_p must be > 0, got {self.top_p}")
        if self.repetition_penalty <= 0.0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or abs(self.seed) >= 2**63):
            bad(f"seed must be a 64-bit integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if self.prompt_logits and self.prompt_logprobs is None:
            bad("prompt_logits needs prompt_logprobs (0 or more)")
        f = self.prompt_logits_from
        if f is not None:
            if not isinstance(f, int) or isinstance(f, bool) or f < 1:
                bad(f"prompt_logits_from must be an integer >= 1, got {f!r}")
            if self.prompt_logprobs is None:
                bad("prompt_logits_from needs prompt_logprobs (0 or more)")
        if self.stop is not None:
            if not isinstance(self.stop, list) or len(self.stop) > MAX_STOP_STRINGS:
                bad(f"stop must be a list of at most {MAX_STOP_STRINGS} strings")
            if any(not isinstance(s, str) or not s for s in self.stop):
                bad("stop strings must be non-empty strings")
        if self.stop_token_ids is not None and any(
            not isinstance(t, int) or t < 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and not self.needs_logit_changes

    @property
    def needs_logit_changes(self) -> bool:
        return bool(self.logits_processors) or self.repetition_penalty != 1.0 or (
            self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # top-k alternatives


@dataclass
class SampleState:
    """What the sampler needs to remember about one request between steps."""

    params: SamplingParams
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> count


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed % (2**63))
    return g


def apply_penalties(logits: Tensor, st: SampleState, generated: list[int]) -> Tensor:
    # logits: (V,) fp32 -> (V,)
    p = st.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(st.prompt_ids) | set(generated)), dtype=torch.long,
                            device=logits.device)
        if seen.numel():
            vals = logits[seen]
            vals = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            logits = logits.index_copy(0, seen, vals)
    if (p.presence_penalty or p.frequency_penalty) and st.counts:
        ids = torch.tensor(list(st.counts), dtype=torch.long, device=logits.device)
        cnt = torch.tensor(list(st.counts.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, -(p.frequency_penalty * cnt + p.presence_penalty))
    for proc in p.logits_processors or []:
        logits = proc(list(generated), logits)
    return logits


def filter_probs(logits: Tensor, p: SamplingParams) -> Tensor:
    """logits (V,) -> probabilities (V,) after temperature, top-k, top-p and min-p."""
    logits = logits / p.temperature
    V = logits.shape[-1]
    if 0 < p.top_k < V:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        cum = sp.cumsum(0)
        sp = sp.masked_fill((cum - sp) > p.top_p, 0.0)  # smallest set with mass >= top_p
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def sample_rows(
    logits: Tensor, states: list[SampleState], generated: list[list[int]],
    default_gen: torch.Generator | None,
) -> list[int]:
    """logits: (B, V) fp32 raw model logits -> one token id per row."""
    greedy_rows = [i for i, s in enumerate(states) if s.params.greedy]
    if len(greedy_rows) == len(states):  # the common case: one argmax, no gathers
        return logits.argmax(dim=-1).tolist()
    out: list[int] = [0] * len(states)
    if greedy_rows:
        idx = torch.tensor(greedy_rows, device=logits.device)
        ids = logits.index_select(0, idx).argmax(dim=-1).tolist()
        for i, t in zip(greedy_rows, ids, strict=True):
            out[i] = t
    for i, st in enumerate(states):
        if st.params.greedy:
            continue
        row = apply_penalties(logits[i], st, generated[i])
        if st.params.temperature == 0.0:
            out[i] = int(row.argmax())
            continue
        probs = filter_probs(row, st.params)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            out[i] = int(row.argmax())  # a processor masked everything sensible: stay greedy
            continue
        gen = st.generator if st.generator is not None else default_gen
        out[i] = int(torch.multinomial(probs, 1, generator=gen))
    return out


def token_logprobs(logits: Tensor, chosen: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits (B, V) raw; chosen ids; ks[i] = how many top alternatives row i wants."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    idx = torch.tensor(chosen, device=lp.device)
    picked = lp.gather(1, idx[:, None]).squeeze(1).tolist()
    kmax = max(ks) if ks else 0
    tops: list[dict[int, float]] = [{} for _ in chosen]
    if kmax > 0:
        tv, ti = lp.topk(kmax, dim=-1)
        tvl, til = tv.tolist(), ti.tolist()
        for i, k in enumerate(ks):
            tops[i] = {int(t): float(v) for t, v in zip(til[i][:k], tvl[i][:k], strict=True)}
    return [TokenLogprob(c, float(p), t) for c, p, t in zip(chosen, picked, tops, strict=True)]


def prompt_logprob_values(logits: Tensor, prompt: list[int]) -> list[float | None]:
    """logits (T, V) at prompt positions 0..T-1 -> logprob of each prompt token (first: None)."""
    if not prompt:
        return []
    lp = torch.log_softmax(logits[: len(prompt) - 1].float(), dim=-1)  # (T-1, V)
    nxt = torch.tensor(prompt[1:], device=lp.device, dtype=torch.long)
    vals = lp.gather(1, nxt[:, None]).squeeze(1).tolist() if len(prompt) > 1 else []
    return [None, *[float(v) for v in vals]]
