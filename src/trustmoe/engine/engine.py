"""The inference engine: requests in, token and text deltas out.

    engine = Engine("runs/demo/model", quantize="int8")          # or Engine(path, EngineConfig(...))
    engine.generate(["Once upon a time"], max_tokens=32)[0].text

Every setting is a field of `EngineConfig` (`config.py`); keyword overrides are its field
names. Weights are read by name (`weights.py`), from a model directory or a `Transformer`'s
Hugging Face state dict. `step()` is one schedule -> execute -> update cycle (see
`scheduler.py` and `runner.py`); `generate()` drives it until every prompt is done. Not
thread-safe: one thread calls `step()`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer

from trustmoe.config import AUTO_DEVICE, EngineConfig
from trustmoe.data.tokenizer import TextCodec
from trustmoe.engine.artifact import load_weights
from trustmoe.engine.features import FeatureAccumulator, RequestFeatures
from trustmoe.engine.kv_cache import BlockPool, PagedKVCache
from trustmoe.engine.output import OutputBuilder, RequestOutput
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
from trustmoe.model.hf import hf_state_dict
from trustmoe.model.transformer import Transformer


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


class Engine:
    def __init__(self, model: str | Path | Transformer, config: EngineConfig | None = None, *,
                 tokenizer: Tokenizer | None = None, **overrides: Any) -> None:
        """`model`: a model directory (Hugging Face safetensors or a quantized artifact) or a
        `Transformer`. `config`: every setting (default `EngineConfig()`); `overrides` are
        EngineConfig field names, e.g. `Engine(path, quantize="int8", kv_cache_mb=64)`.
        `device="auto"` is `resolve_device("auto")` for a directory and the module's own
        device for a `Transformer`.
        Raises ConfigError (a ValueError) naming a setting that cannot work."""
        cfg = config or EngineConfig()
        cfg = cfg.replace(**overrides) if overrides else cfg
        cfg.validate()  # a config whose fields were assigned after construction
        self.engine_config = cfg
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        in_memory = isinstance(model, Transformer) and cfg.device == AUTO_DEVICE
        # "auto" for a module in memory: where it already is
        dev = model.device if isinstance(model, Transformer) and in_memory else cfg.resolve_device()
        self.device = dev
        weights, tok, name = self._load(model, cfg, dev)
        if tokenizer is not None:
            tok = tokenizer
        self.tokenizer: Tokenizer | None = tok
        self.model_name = name
        self.weights: RunnerWeights = weights
        mcfg = weights.cfg
        self.config = mcfg
        self.max_model_len = mcfg.max_position_embeddings
        self.eos_token_id: int | None = mcfg.eos_token_id
        if self.eos_token_id is None and tok is not None:
            self.eos_token_id = tok.token_to_id("<|endoftext|>")
        block_size = cfg.block_size
        kv_dtype = getattr(torch, cfg.kv_cache_dtype) if cfg.kv_cache_dtype else weights.dtype
        per_block = PagedKVCache.bytes_per_block(mcfg.num_hidden_layers, mcfg.num_key_value_heads,
                                                 mcfg.head_size, block_size, kv_dtype)
        num_blocks = max(1, int(cfg.kv_cache_mb * 2**20) // per_block)
        self.block_size = block_size
        self.kv = PagedKVCache(mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.head_size,
                               num_blocks, block_size, kv_dtype, dev)
        self.pool = BlockPool(num_blocks, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, block_size, cfg.max_num_seqs, cfg.max_queue,
                                   cfg.prefill_chunk, self.max_model_len, dev)
        self.runner = ModelRunner(weights, self.kv, dev, cfg.batch_invariant, cfg.moe_path,
                                  cfg.fast_decode)
        self.outputs = OutputBuilder(self.decode, self.eos_token_id, self.max_model_len)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        # cfg.features: request id -> features being built (prefill) / built (until finished)
        self._acc: dict[str, FeatureAccumulator] = {}
        self._feats: dict[str, RequestFeatures] = {}
        self._ids = itertools.count()

    @staticmethod
    def _load(model: str | Path | Transformer, cfg: EngineConfig, device: torch.device,
              ) -> tuple[RunnerWeights, Tokenizer | None, str]:
        if isinstance(model, Transformer):
            dtype = cfg.torch_dtype or model.embed_tokens.weight.dtype
            w = build_weights(hf_state_dict(model), model.config, cfg.quantize, cfg.group_size,
                              device, dtype, cfg.exact_int8)
            return w, None, "model"
        from trustmoe.data.tokenizer import load_tokenizer

        path = Path(model)
        tok = load_tokenizer(path) if (path / "tokenizer.json").exists() else None
        w = load_weights(path, cfg.quantize, cfg.group_size, device, cfg.torch_dtype, cfg.exact_int8)
        _release_freed_memory()  # the file's tensors we read from are garbage now
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
        if params.prompt_logits_from is not None and params.prompt_logits_from >= len(ids):
            raise ValueError(f"prompt_logits_from ({params.prompt_logits_from}) must be below "
                             f"the prompt length ({len(ids)})")
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
        if self.engine_config.features:
            c = self.config
            self._acc[rid] = FeatureAccumulator(ids, c.hidden_size, c.num_hidden_layers if c.is_moe else 0,
                                                c.num_local_experts if c.is_moe else 0)
        return rid

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.finished:
            return
        self.scheduler.free(seq)
        seq.finished, seq.finish_reason = True, "abort"
        self._acc.pop(request_id, None)
        self._feats.pop(request_id, None)
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
            want, skip = "none", 0
            if s.params.prompt_logprobs is not None and not s.prefilled:
                want = "all"
                if s.params.prompt_logits_from is not None:  # rows before it are not scored
                    skip = max(0, s.params.prompt_logits_from - 1 - w.start)
                    if skip >= w.length:  # never the last chunk: its last row is always scored
                        want, skip = "none", 0
            elif end >= len(s.prompt_ids):
                want = "last"
            n_prompt = len(s.prompt_ids)
            toks = s.output_ids[w.start - n_prompt: end - n_prompt] if w.start >= n_prompt \
                else s.all_ids[w.start:end]
            chunks.append(Chunk(toks, w.start, s.slots[:end], want,
                                first_slot=self.scheduler.first_slot(s), skip=skip,
                                features=self._acc.get(s.request_id) if w.start < n_prompt else None))
        logits = self.runner.forward(chunks)
        to_sample: list[tuple[Sequence, torch.Tensor]] = []
        finished_now: list[Sequence] = []
        for w, lg in zip(work, logits, strict=True):
            s = w.seq
            was_prefilled = s.prefilled
            if s.params.prompt_logprobs is not None and not was_prefilled and lg is not None:
                self._add_prompt_logprobs(s, w.start, lg)
            self.scheduler.after_forward(s, w.start + w.length)
            if s.prefilled and s.request_id in self._acc:
                self._feats[s.request_id] = self._acc.pop(s.request_id).finish()
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
        if self._feats:
            for o in outs:  # a request's features ride on its finished output
                if o.finished:
                    o.features = self._feats.pop(o.request_id, None)
        return outs

    def _add_prompt_logprobs(self, s: Sequence, start: int, lg: torch.Tensor) -> None:
        """lg: (T, V) logits of this chunk's positions from start + skip on, where skip is
        how many leading positions precede `prompt_logits_from - 1` (they are not scored)."""
        f = s.params.prompt_logits_from
        if f is not None:
            first = max(start, f - 1)  # the position of lg's first row
            if s.prompt_logprobs is None:  # prompt tokens 0..f-1 are not scored
                s.prompt_logprobs = [None] * f
                if s.params.prompt_logprobs:
                    s.prompt_top_logprobs = [None] * f
            start = first
        self.outputs.add_prompt_logprobs(s, start, lg)

    def _sample_and_update(self, rows: list[tuple[Sequence, torch.Tensor]]) -> list[RequestOutput]:
        seqs = [s for s, _ in rows]
        logits = rows[0][1][None] if len(rows) == 1 else torch.stack([lg for _, lg in rows])  # (B, V)
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
