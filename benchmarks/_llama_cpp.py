"""llama.cpp through llama-cpp-python's low-level API, as `vs_llama_cpp.py` drives it.

Raw contexts made from llama.cpp's own default context parameters (flash attention "auto",
an f16 KV cache, as `llama-cli` uses); the next token is numpy's argmax over
`llama_get_logits_ith`, so no sampler chain and no EOS stop gets in the way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

GGML_TYPE_F32 = 0


def import_llama_cpp() -> Any:
    """The `llama_cpp` package (llama-cpp-python); ImportError where it is not installed."""
    import llama_cpp

    return llama_cpp


class LlamaCpp:
    """One GGUF file in llama.cpp; greedy decode through `llama_decode` on raw contexts."""

    def __init__(self, path: Path, threads: int, ctx_per_seq: int, max_batch: int) -> None:
        llama_cpp = import_llama_cpp()
        self.lc = llama_cpp
        # Llama() loads the model quietly; its own context stays unused (kept tiny)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=64, n_ubatch=64,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.model = self.llm._model.model
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.threads, self.ctx_per_seq, self.max_batch = threads, ctx_per_seq, max_batch
        self._ctxs: dict[tuple[int, bool, int], Any] = {}
        self.params: dict[str, Any] = {}
        self.batch = llama_cpp.llama_batch_init(max_batch, 0, 1)

    def ctx(self, n_seq: int, f32_kv: bool = False, per_seq: int | None = None) -> Any:
        per_seq = per_seq or self.ctx_per_seq
        key = (n_seq, f32_kv, per_seq)
        if key not in self._ctxs:
            p = self.lc.llama_context_default_params()
            p.n_ctx = n_seq * per_seq
            p.n_batch = max(int(p.n_batch), self.max_batch)  # the 16 prompts go in one llama_decode
            p.n_seq_max = n_seq
            p.n_threads = p.n_threads_batch = self.threads
            if f32_kv:
                p.type_k = p.type_v = GGML_TYPE_F32
                p.flash_attn_type = self.lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            c = self.lc.llama_init_from_model(self.model, p)
            if not c:
                raise RuntimeError(f"llama.cpp could not make a context for {n_seq} sequences")
            self._ctxs[key] = c
            if not f32_kv and per_seq == self.ctx_per_seq:
                self.params = {"flash_attn_type": int(p.flash_attn_type), "type_k": int(p.type_k),
                               "type_v": int(p.type_v), "kv_unified": bool(p.kv_unified),
                               "n_batch": int(p.n_batch), "n_ubatch": int(p.n_ubatch),
                               "n_ctx_per_seq": self.ctx_per_seq}
        return self._ctxs[key]

    def _decode(self, ctx: Any, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, pos, seq, want logits) -> argmax token of each row that wants logits."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (t, p, s, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, int(out)
            b.seq_id[i][0] = s
        rc = self.lc.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return [int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())
                for i, it in enumerate(items) if it[3]]

    def _clear(self, ctx: Any) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)

    def greedy(self, prompt: list[int], n: int, f32_kv: bool = False,
               per_seq: int | None = None) -> tuple[list[int], float]:
        """(n greedy tokens, decode tok/s excluding prefill and the first token)."""
        ctx = self.ctx(1, f32_kv, per_seq)
        self._clear(ctx)
        P = len(prompt)
        out = self._decode(ctx, [(t, i, 0, i == P - 1) for i, t in enumerate(prompt)])
        t0 = time.perf_counter()
        for k in range(n - 1):
            out += self._decode(ctx, [(out[-1], P + k, 0, True)])
        dt = time.perf_counter() - t0
        return out, (n - 1) / max(dt, 1e-9)

    def prefill(self, prompt: list[int]) -> float:
        """Prompt tokens/s of one prompt in one llama_decode (logits of its last token only)."""
        ctx = self.ctx(1, False, -(-len(prompt) // 256) * 256 + 256)
        self._clear(ctx)
        t0 = time.perf_counter()
        self._decode(ctx, [(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        return len(prompt) / (time.perf_counter() - t0)

    def prompt_logits(self, prompt: list[int]) -> np.ndarray:
        """Logits after the prompt, f32 KV cache, no flash attention."""
        ctx = self.ctx(1, True)
        self._clear(ctx)
        self._decode(ctx, [(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        ptr = self.lc.llama_get_logits_ith(ctx, len(prompt) - 1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def batched(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
        """All prompts decoded together (one llama_batch, a seq_id each): (tokens, total tok/s)."""
        ctx = self.ctx(len(prompts))
        self._clear(ctx)
        t0 = time.perf_counter()
        items = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        outs = [[t] for t in self._decode(ctx, items)]
        for k in range(n - 1):
            nxt = self._decode(ctx, [(o[-1], len(p) + k, s, True)
                                     for s, (p, o) in enumerate(zip(prompts, outs, strict=True))])
            for o, t in zip(outs, nxt, strict=True):
                o.append(t)
        dt = time.perf_counter() - t0
        return outs, len(prompts) * n / dt

    def sequential(self, prompts: list[list[int]], n: int) -> float:
        """The requests one after another on one sequence: total tok/s (prefill included)."""
        ctx = self.ctx(1)
        t0 = time.perf_counter()
        for p in prompts:
            self._clear(ctx)
            out = self._decode(ctx, [(t, i, 0, i == len(p) - 1) for i, t in enumerate(p)])
            for k in range(n - 1):
                out += self._decode(ctx, [(out[-1], len(p) + k, 0, True)])
        return len(prompts) * n / (time.perf_counter() - t0)

    def close(self) -> None:
        for c in self._ctxs.values():
            self.lc.llama_free(c)
        self._ctxs.clear()
        self.lc.llama_batch_free(self.batch)
        self.llm.close()
