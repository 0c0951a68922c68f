"""RMSNorm, rotary position embeddings and grouped-query attention as modules.

The maths is `trustmoe.model.functional`'s; these modules only hold the parameters. Layouts
match Hugging Face Llama/Mixtral exactly (non-interleaved "rotate half" RoPE), so weights
move between the two without permutation.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from trustmoe.config import ModelConfig
from trustmoe.model import functional as tf


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return tf.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Precomputes cos/sin tables; `forward(positions)` indexes them."""

    inv_freq: Tensor  # (hd/2,)
    cos: Tensor  # (n, hd)
    sin: Tensor  # (n, hd)

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", tf.rope_inv_freq(head_dim, theta), persistent=False)
        self.max_positions = max_positions
        self._build(max_positions)

    def reset(self, device: torch.device | str | None = None) -> None:
        """Recompute every table (after the module was made on the meta device)."""
        self.register_buffer("inv_freq", tf.rope_inv_freq(self.head_dim, self.theta, device),
                             persistent=False)
        self._build(self.max_positions)

    def _build(self, n: int) -> None:
        cos, sin = tf.rope_tables(self.inv_freq, n)  # (n, hd)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        # positions: (B, T) or (T,) int64 -> cos, sin: (..., T, hd)
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0]:
            self._build(max(needed, 2 * self.cos.shape[0]))
        return self.cos[positions], self.sin[positions]


class KVCacheLike(Protocol):
    """What attention needs from a cache: store new K/V for a layer, return all K/V to attend to."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v: (B, Hkv, T_new, hd) -> all keys/values (B, Hkv, S, hd)."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.hd = cfg.head_size
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, d, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCacheLike | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        # x: (B, T, d); cos, sin: (T, hd) or (B, T, hd) -> (B, T, d)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if cos.dim() == 3:  # per-sequence positions: line them up with the head axis
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
        q, k = tf.apply_rope(q, cos, sin), tf.apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hd)
        causal = attn_mask is None and k.shape[2] == T
        y = tf.attention(q, k, v, attn_mask, causal=causal)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, H*hd)
        return self.o_proj(y)
