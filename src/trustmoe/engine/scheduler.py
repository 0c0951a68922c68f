"""Continuous batching: one scheduling decision per forward pass.

Every step the scheduler picks (a) one decode token for each running sequence whose prompt is
done, then (b) prompt chunks of at most `prefill_chunk` tokens, first-come first-served, up to
a per-step prefill budget of `prefill_chunk` tokens, admitting waiting requests while a batch
slot and KV blocks are free. A prompt is always cut at the same places (every `prefill_chunk`
tokens after its cached prefix) whatever else is running, which keeps results batch-invariant.

KV blocks are reserved at admission for the whole request (prompt + max_tokens), so a running
sequence never runs out of blocks and nothing is ever preempted; blocks are allocated lazily
from that reservation and freed the moment a request finishes or is aborted.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trustmoe.engine.kv_cache import BlockKey, BlockPool, block_keys
from trustmoe.engine.sampling import SampleState, SamplingParams, TokenLogprob


class QueueFullError(Exception):
    """add_request while the bounded waiting queue is full."""


class PromptTooLongError(ValueError):
    """Prompt + max_tokens exceeds the model context, or can never fit the KV budget."""


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sample: SampleState
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    slots: Tensor | None = None  # (max_blocks * bs,) slot of every position of this sequence
    num_computed: int = 0  # positions whose K/V are in the cache
    num_cached_prompt: int = 0
    num_registered: int = 0  # leading full blocks already offered to the prefix cache
    reserved: int = 0  # blocks still reserved for this sequence, not yet allocated
    finished: bool = False
    finish_reason: str | None = None
    first_token_time: float | None = None
    # detokenization and streaming state
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    prefix_offset: int = 0
    read_offset: int = 0
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None  # when prompt_logprobs > 0
    prompt_logprobs_sent: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int
    length: int


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_queue: int,
                 prefill_chunk: int, max_model_len: int, device: torch.device) -> None:
        self.pool, self.bs = pool, block_size
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.prefill_chunk, self.max_model_len = prefill_chunk, max_model_len
        self.device = device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.outstanding = 0  # blocks reserved by running sequences but not yet allocated

    def blocks_for(self, seq: Sequence) -> int:
        total = min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_model_len)
        return math.ceil(total / self.bs)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"waiting queue is full ({self.max_queue} requests)")
        if self.blocks_for(seq) > self.pool.num_blocks:
            raise PromptTooLongError(
                f"request needs {self.blocks_for(seq)} KV blocks of {self.bs} tokens but the cache "
                f"holds {self.pool.num_blocks}; raise kv_cache_mb or lower max_tokens")
        self.waiting.append(seq)

    def _prefix_keys(self, seq: Sequence) -> list[BlockKey]:
        p = seq.params
        if p.prompt_logprobs is not None:
            if p.prompt_logits_from is None:
                return []  # every prompt position must be computed to score it
            # positions from prompt_logits_from - 1 on are computed (their logits are scored);
            # the full blocks before that may be reused
            return block_keys(seq.prompt_ids[: p.prompt_logits_from - 1], self.bs)
        return block_keys(seq.prompt_ids[: len(seq.prompt_ids) - 1], self.bs)

    def _try_admit(self, seq: Sequence) -> bool:
        keys = self._prefix_keys(seq)
        cached, unreferenced = self.pool.count_cached_unreferenced(keys)
        need_new = self.blocks_for(seq) - cached
        if self.pool.num_available() - unreferenced - self.outstanding < need_new:
            return False
        hits = self.pool.match_prefix(keys)
        seq.block_table = list(hits)
        seq.slots = torch.empty(self.blocks_for(seq) * self.bs, dtype=torch.long,
                                device=self.device)
        for i, b in enumerate(hits):
            self._set_slots(seq, i, b)
        seq.num_computed = seq.num_cached_prompt = len(hits) * self.bs
        seq.num_registered = len(hits)
        seq.reserved = need_new
        self.outstanding += need_new
        return True

    def _set_slots(self, seq: Sequence, index: int, block: int) -> None:
        assert seq.slots is not None
        seq.slots[index * self.bs:(index + 1) * self.bs] = torch.arange(
            block * self.bs, (block + 1) * self.bs, device=self.device)

    def schedule(self) -> list[ScheduledChunk]:
        """Decide this step's work: decodes first, then FCFS prompt chunks."""
        work = [ScheduledChunk(s, s.num_computed, 1) for s in self.running if s.prefilled]
        budget = self.prefill_chunk
        for s in self.running:
            if not s.prefilled:
                n = min(self.prefill_chunk, len(s.prompt_ids) - s.num_computed)
                if n > budget:
                    budget = 0
                    break
                work.append(ScheduledChunk(s, s.num_computed, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            s = self.waiting[0]
            if not self._try_admit(s):
                break
            self.waiting.popleft()
            self.running.append(s)
            n = min(self.prefill_chunk, len(s.prompt_ids) - s.num_computed)
            if n > budget:
                break
            work.append(ScheduledChunk(s, s.num_computed, n))
            budget -= n
        for w in work:
            self._ensure_blocks(w.seq, w.start + w.length)
        return work

    def _ensure_blocks(self, seq: Sequence, length: int) -> None:
        while len(seq.block_table) * self.bs < length:
            b = self.pool.allocate()
            self._set_slots(seq, len(seq.block_table), b)
            seq.block_table.append(b)
            seq.reserved -= 1
            self.outstanding -= 1

    def first_slot(self, seq: Sequence) -> int | None:
        """The first slot when the sequence's blocks are consecutive (attention reads a view)."""
        t = seq.block_table
        if t and t[-1] - t[0] == len(t) - 1 and all(b == t[0] + i for i, b in enumerate(t)):
            return t[0] * self.bs
        return None

    def after_forward(self, seq: Sequence, computed_to: int) -> None:
        """K/V of positions < computed_to are written: offer newly full blocks to the cache."""
        seq.num_computed = computed_to
        full = computed_to // self.bs
        if full > seq.num_registered:
            ids = seq.all_ids
            keys = block_keys(ids[: full * self.bs], self.bs)
            for i in range(seq.num_registered, full):
                self.pool.register(seq.block_table[i], keys[i])
            seq.num_registered = full

    def free(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks and reservation."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            return
        for b in seq.block_table:
            self.pool.release(b)
        seq.block_table = []
        self.outstanding -= seq.reserved
        seq.reserved = 0
