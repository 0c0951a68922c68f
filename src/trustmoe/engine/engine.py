"""The inference engine: requests in, token and text deltas out.

    engine = Engine("runs/demo/model", quantize="int8")
    engine.generate(["Once upon a time"], max_tokens=32)[0].text

`step()` is one schedule -> execute -> update cycle (see `scheduler.py` and `runner.py`);
`generate()` drives it until every prompt is done. Not thread-safe: one thread calls `step()`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer

from trustmoe.data.tokenizer import TextCodec
from trustmoe.engine.kv_cache import BlockPool, PagedKVCache
from trustmoe.engine.output import OutputBuilder
from trustmoe.engine.runner import Chunk, ModelRunner
from trustmoe.engine.sampling import (
    SampleState,
    SamplingParams,
    TokenLogprob,
    make_generator,
    sample_rows,
    token_logprobs,
)
from trustmoe.engine.scheduler import (
    PromptTooLongError,
    QueueFullError,
    Scheduler,
    Sequence,
)
from trustmoe.engine.weights import RunnerWeights, build_weights
from trustmoe.model.transformer import Transformer


@dataclass
class RequestOutput:
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


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[float | None] | None
    prompt_token_ids: list[int]
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_usage: float
    prefix_cache_hits: int
    prefix_cache_queries: int


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so resident memory
    reflects the weights actually kept."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Engine:
    def __init__(
        self, model: str | Path | Transformer, *, quantize: str | None = None,
        group_size: int = 64, kv_cache_mb: float = 256, block_size: int = 16,
        max_num_seqs: int = 32, max_queue: int = 256, prefill_chunk: int = 256,
        device: str | None = None, dtype: torch.dtype | None = None, tokenizer: Any = None,
        batch_invariant: bool = True, enable_prefix_caching: bool = True,
        moe_path: str = "auto", exact_int8: bool = False, num_threads: int | None = None,
        fast_decode: bool = True,
    ) -> None:
        """Extra options beyond the contract: `batch_invariant` (bit-identical results alone or
        batched; False batches decode matmuls freely for more throughput),
        `enable_prefix_caching`, `moe_path` ("auto" | "sorted" | "gather"), `exact_int8`
        (where the compiled CPU kernels are unavailable: weight-only int8 numerics instead of
        fbgemm's dynamic activation quantization), `num_threads` (sets torch's process-wide
        intra-op threads; on a busy 2-core machine 1 thread, or OMP_WAIT_POLICY=PASSIVE, avoids
        OpenMP spin-wait collapses of ~5x) and `fast_decode` (CPU decode rows through the
        whole-block C kernels of `trustmoe.engine.fast_decode`; False keeps torch ops)."""
        if num_threads is not None:
            if not isinstance(num_threads, int) or num_threads < 1:
                raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
            torch.set_num_threads(num_threads)
        if quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_queue", max_queue), ("prefill_chunk", prefill_chunk),
                        ("group_size", group_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {kv_cache_mb}")
        dev = torch.device(device) if device else default_device()
        self.device = dev
        weights, tok, name = self._load(model, quantize, group_size, dev, dtype, exact_int8)
        if tokenizer is not None:
            tok = tokenizer
        self.tokenizer: Tokenizer | None = tok
        self.model_name = name
        self.weights: RunnerWeights = weights
        cfg = weights.cfg
        self.config = cfg
        self.max_model_len = cfg.max_position_embeddings
        self.eos_token_id: int | None = cfg.eos_token_id
        if self.eos_token_id is None and tok is not None:
            self.eos_token_id = tok.token_to_id("<|endoftext|>")
        per_block = PagedKVCache.bytes_per_block(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                 cfg.head_size, block_size, weights.dtype)
        num_blocks = max(1, int(kv_cache_mb * 2**20) // per_block)
        self.block_size = block_size
        self.kv = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size,
                               num_blocks, block_size, weights.dtype, dev)
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, block_size, max_num_seqs, max_queue,
                                   prefill_chunk, self.max_model_len, dev)
        self.runner = ModelRunner(weights, self.kv, dev, batch_invariant, moe_path, fast_decode)
        self.outputs = OutputBuilder(self)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self._ids = itertools.count()

    @staticmethod
    def _load(model: str | Path | Transformer, quantize: str | None, group_size: int,
              device: torch.device, dtype: torch.dtype | None, exact_int8: bool,
              ) -> tuple[RunnerWeights, Tokenizer | None, str]:
        if isinstance(model, Transformer):
            w = build_weights(model, quantize, group_size, device, dtype, exact_int8)
            return w, None, "model"
        from trustmoe.data.tokenizer import load_tokenizer
        from trustmoe.engine.artifact import is_quantized_dir, load_quantized
        from trustmoe.model.hf import load

        path = Path(model)
        tok = load_tokenizer(path) if (path / "tokenizer.json").exists() else None
        if is_quantized_dir(path):
            w = load_quantized(path, device, exact_int8)
            if quantize is not None and quantize != w.quantize:
                raise ValueError(f"{path} holds {w.quantize} weights; cannot apply {quantize}")
            return w, tok, path.resolve().name
        m = load(path, device="cpu")
        w = build_weights(m, quantize, group_size, device, dtype, exact_int8)
        del m
        _release_freed_memory()  # the float model we read from is garbage now
        return w, tok, path.resolve().name

    # ------------------------------------------------------------ text

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Prompt text -> ids through `trustmoe.data.tokenizer.TextCodec` (the model's BOS in
        front), the one encoding completions, chat, eval and generate share."""
        return self.codec.encode(text, add_bos=add_bos)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.codec.decode(ids)

    @property
    def codec(self) -> TextCodec:
        """The engine's `TextCodec` (BOS from the model config, else the tokenizer's)."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass token ids")
        c: TextCodec | None = self.__dict__.get("_codec")
        if c is None or c.tokenizer is not self.tokenizer:
            c = TextCodec.create(self.tokenizer, bos_id=self.config.bos_token_id,
                                 eos_id=self.eos_token_id)
            self.__dict__["_codec"] = c
        return c

    # ------------------------------------------------------------ requests

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        params.validate(self.max_model_len)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        V = self.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < V for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {V})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model "
                f"context of {self.max_model_len} tokens")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        state = SampleState(params, ids, make_generator(params.seed, self.device))
        seq = Sequence(rid, ids, params, state)
        self.scheduler.add(seq)
        self._seqs[rid] = seq
        return rid

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.finished:
            return
        self.scheduler.free(seq)
        seq.finished, seq.finish_reason = True, "abort"
        self._pending.append(self.outputs.make(seq, [], finished=True))

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._pending)

    def stats(self) -> EngineStats:
        ps = self.pool.stats()
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks_total=ps.total, kv_blocks_used=ps.used,
            kv_usage=ps.used / ps.total if ps.total else 0.0,
            prefix_cache_hits=ps.hits, prefix_cache_queries=ps.queries,
        )

    # ------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """One scheduling decision, one forward pass, one update."""
        outs, self._pending = self._pending, []
        work = self.scheduler.schedule()
        if not work:
            return outs
        chunks: list[Chunk] = []
        for w in work:
            s = w.seq
            end = w.start + w.length
            assert s.slots is not None
            want = "none"
            if s.params.prompt_logprobs is not None and not s.prefilled:
                want = "all"
            elif end >= len(s.prompt_ids):
                want = "last"
            n_prompt = len(s.prompt_ids)
            toks = s.output_ids[w.start - n_prompt: end - n_prompt] if w.start >= n_prompt \
                else s.all_ids[w.start:end]
            chunks.append(Chunk(toks, w.start, s.slots[:end], want,
                                first_slot=self.scheduler.first_slot(s)))
        logits = self.runner.forward(chunks)
        to_sample: list[tuple[Sequence, torch.Tensor]] = []
        finished_now: list[Sequence] = []
        for w, lg in zip(work, logits, strict=True):
            s = w.seq
            was_prefilled = s.prefilled
            if s.params.prompt_logprobs is not None and not was_prefilled and lg is not None:
                self.outputs.add_prompt_logprobs(s, w.start, lg)
            self.scheduler.after_forward(s, w.start + w.length)
            if not s.prefilled or lg is None:
                continue
            if s.params.max_tokens == 0:
                s.finished, s.finish_reason = True, "length"
                finished_now.append(s)
                continue
            to_sample.append((s, lg[-1]))
        if to_sample:
            outs += self._sample_and_update(to_sample)
        for s in finished_now:
            outs.append(self.outputs.make(s, [], finished=True))
            self._finish(s)
        return outs

    def _sample_and_update(self, rows: list[tuple[Sequence, torch.Tensor]]) -> list[RequestOutput]:
        seqs = [s for s, _ in rows]
        logits = torch.stack([lg for _, lg in rows])  # (B, V) fp32
        ids = sample_rows(logits, [s.sample for s in seqs], [s.output_ids for s in seqs], None)
        want = [s.params.logprobs is not None for s in seqs]
        lps: list[TokenLogprob | None] = [None] * len(seqs)
        if any(want):
            idx = [i for i, wt in enumerate(want) if wt]
            got = token_logprobs(logits[idx], [ids[i] for i in idx],
                                 [seqs[i].params.logprobs or 0 for i in idx])
            for i, got_lp in zip(idx, got, strict=True):
                lps[i] = got_lp
        now = time.monotonic()
        outs = []
        for s, t, lp in zip(seqs, ids, lps, strict=True):
            if s.first_token_time is None:
                s.first_token_time = now
            s.output_ids.append(t)
            s.sample.counts[t] = s.sample.counts.get(t, 0) + 1
            if lp is not None:
                s.new_logprobs.append(lp)
            self.outputs.update_text(s, t)
            outs.append(self.outputs.make(s, [t], finished=s.finished))
            if s.finished:
                self._finish(s)
        return outs

    def _finish(self, s: Sequence) -> None:
        self.scheduler.free(s)
        self._seqs.pop(s.request_id, None)

    # ------------------------------------------------------------ batch API

    def generate(
        self, prompts: list[str] | list[list[int]], max_tokens: int = 16,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
        stop: list[str] | None = None,
        params: SamplingParams | list[SamplingParams] | None = None, **kw: Any,
    ) -> list[GenerationResult]:
        """Run every prompt to completion (batched) and return one result per prompt."""
        if params is None:
            plist = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed, stop=stop, **kw) for _ in prompts]
        elif isinstance(params, SamplingParams):
            plist = [params] * len(prompts)
        else:
            if len(params) != len(prompts):
                raise ValueError("params must be one SamplingParams or one per prompt")
            plist = list(params)
        base = f"gen-{next(self._ids)}-"
        todo: list[tuple[int, str | list[int]]] = [
            (i, p) for i, p in enumerate(cast(list[str | list[int]], prompts))][::-1]
        results: dict[int, GenerationResult] = {}
        lps: dict[str, list[TokenLogprob]] = {}
        plps: dict[str, list[float | None]] = {}
        ptops: dict[str, list[dict[int, float] | None]] = {}
        while todo or self.has_unfinished():
            while todo:
                i, p = todo[-1]
                try:
                    self.add_request(p, plist[i], f"{base}{i}")
                except QueueFullError:
                    break
                todo.pop()
            for o in self.step():
                if not o.request_id.startswith(base):
                    continue
                lps.setdefault(o.request_id, []).extend(o.logprobs)
                if o.prompt_logprobs is not None:
                    plps[o.request_id] = o.prompt_logprobs
                if o.prompt_top_logprobs is not None:
                    ptops[o.request_id] = o.prompt_top_logprobs
                if o.finished:
                    i = int(o.request_id[len(base):])
                    results[i] = GenerationResult(
                        o.token_ids, o.text, o.finish_reason or "stop", lps.pop(o.request_id),
                        plps.pop(o.request_id, None), o.prompt_token_ids,
                        ptops.pop(o.request_id, None))
        return [results[i] for i in range(len(prompts))]
