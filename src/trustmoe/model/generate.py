"""A small contiguous KV cache and a single-sequence decode loop.

This is the simple path used by `trustmoe generate` and the demo; the batched, paged
engine lives in `trustmoe.engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from trustmoe.model.transformer import Transformer


class StaticKVCache:
    """Preallocated (L, B, Hkv, S_max, hd) keys and values; `pos` is the filled length."""

    def __init__(
        self, n_layers: int, batch: int, n_kv: int, max_len: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        shape = (n_layers, batch, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v: (B, Hkv, T, hd) -> (B, Hkv, pos+T, hd)
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


def causal_mask(past: int, T: int, device: torch.device) -> Tensor | None:
    """Boolean mask (T, past+T): query i (at position past+i) sees keys <= past+i."""
    if T == 1:
        return None
    q = torch.arange(T, device=device)[:, None] + past
    k = torch.arange(past + T, device=device)[None, :]
    return k <= q


def sample_next(logits: Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """logits: (B, V) -> next ids (B,). Greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        sorted_p[(cum - sorted_p) > top_p] = 0.0  # keep the smallest set with mass >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    # idx: (1, T) -> (1, T + n)
    cfg = model.config
    B, T = idx.shape
    max_len = min(T + max_new_tokens, cfg.max_position_embeddings)
    if max_len <= T:
        return idx
    dtype = next(model.parameters()).dtype
    cache = StaticKVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, max_len,
                          cfg.head_size, dtype, idx.device)
    out = idx
    positions = torch.arange(T, device=idx.device)
    logits = model.run(idx, positions=positions, cache=cache,
                       attn_mask=causal_mask(0, T, idx.device)).logits[:, -1]
    cache.advance(T)
    n_new = max_len - T
    for i in range(n_new):
        nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if i == n_new - 1 or (eos_token_id is not None and bool((nxt == eos_token_id).all())):
            break
        pos = torch.tensor([cache.pos], device=idx.device)
        logits = model.run(nxt[:, None], positions=pos, cache=cache).logits[:, -1]
        cache.advance(1)
    return out
