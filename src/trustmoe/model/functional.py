"""The one definition of the forward pass: pure tensor functions, no modules, no weights layout.

The training model (`attention.py`, `moe.py`, `transformer.py`) and the engine's torch path
(`trustmoe.engine.runner`) both call these; the engine's C kernels (`trustmoe/engine/csrc`)
are an accelerated copy of the same maths, and every fast path is tested equal to these
functions (`tests/model/test_functional.py`, `tests/model/test_moe.py`,
`tests/engine/test_parity_matrix.py`). Numerics follow Hugging Face Llama/Mixtral:

    rms_norm      x * rsqrt(mean(x^2) + eps) in fp32, cast back, times the weight
    rope          non-interleaved "rotate half": x * cos + rotate_half(x) * sin
    attention     softmax(q k^T / sqrt(hd)) v, causal or masked; H query heads share
                  H / Hkv key/value heads (GQA; MQA when Hkv == 1)
    route         fp32 softmax over all E router logits -> top-k probabilities (descending)
                  -> divided by their sum when `norm_topk_prob` (Mixtral)
    swiglu        silu(gate) * up
    moe           sum over the k chosen experts of weight_j * SwiGLU_j(x), plus a
                  sigmoid-gated shared expert (Qwen2-MoE) when present

Inference is dropless everywhere. The only training-only option, `capacity_factor`, is the
`capacity` argument of `moe` (the training module passes it only in `train()` mode).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------- norm


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., d), weight (d,) -> (..., d); computed in fp32, then cast back to x's dtype."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


# ---------------------------------------------------------------- rotary positions


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """(hd/2,) fp32 inverse frequencies theta^(-2i/hd)."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exps)


def rope_tables(inv_freq: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """cos, sin (length, hd) fp32 for positions 0..length-1 (each half repeats the frequencies)."""
    t = torch.arange(length, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq)  # (length, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (length, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    # x: (..., hd) -> (..., hd) = [-x2, x1]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., hd) with cos/sin broadcastable to it (the caller lines up the position axis)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# ---------------------------------------------------------------- attention


def causal_mask(start: int, T: int, device: torch.device | str | None = None) -> Tensor | None:
    """Boolean (T, start + T): query i, at position start + i, sees keys 0..start + i.

    None for a single query (it sees every key, so no mask is needed)."""
    if T == 1:
        return None
    q = torch.arange(T, device=device)[:, None] + start
    k = torch.arange(start + T, device=device)[None, :]
    return k <= q


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
              causal: bool = False) -> Tensor:
    """Scaled dot-product attention with grouped key/value heads.

    q (B, H, T, hd); k, v (B, Hkv, S, hd) with H a multiple of Hkv -> (B, H, T, hd).
    mask: boolean, broadcastable to (B, H, T, S), True = may attend; causal: T == S and no
    mask, query i sees keys 0..i.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None,
        enable_gqa=q.shape[1] != k.shape[1],
    )


# ---------------------------------------------------------------- routing and experts


def route(logits: Tensor, top_k: int, norm_topk_prob: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Router logits (N, E) -> probs (N, E) fp32, weights (N, k) fp32, experts (N, k) int64.

    fp32 softmax over all experts, the k largest probabilities in descending order, divided
    by their sum when `norm_topk_prob`. (Equal in exact arithmetic to a softmax over the
    top-k logits, but not in floating point: this one formulation is used everywhere.)
    """
    probs = logits.float().softmax(dim=-1)  # (N, E)
    weights, experts = probs.topk(top_k, dim=-1)  # (N, k), (N, k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise (..., h)."""
    return F.silu(gate) * up


def swiglu_packed(gu: Tensor) -> Tensor:
    """gu (..., 2h) = [gate | up] -> (..., h)."""
    g, u = gu.chunk(2, dim=-1)
    return swiglu(g, u)


def mlp(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """One SwiGLU MLP (an expert, the dense FFN or the shared expert).

    x (N, d); w13 (2h, d) = [gate rows; up rows]; w2 (d, h) -> (N, d).
    """
    return F.linear(swiglu_packed(F.linear(x, w13)), w2)


def gate_shared(gate_logit: Tensor, y_shared: Tensor) -> Tensor:
    """The shared expert's contribution: sigmoid(gate_logit (N, 1)) * y_shared (N, d)."""
    return torch.sigmoid(gate_logit) * y_shared


def moe_combine(outs: Tensor, weights: Tensor) -> Tensor:
    """outs (N, k, d) per chosen expert, weights (N, k) -> (N, d), summed in slot order."""
    y = outs[:, 0] * weights[:, 0:1]
    for j in range(1, outs.shape[1]):
        y = y + outs[:, j] * weights[:, j: j + 1]
    return y


def expert_capacity(capacity_factor: float, assignments: int, num_experts: int) -> int:
    """Training only: how many assignments each expert keeps (Switch Transformer)."""
    return max(1, math.ceil(capacity_factor * assignments / num_experts))


def moe(
    x: Tensor, router: Tensor, w13: Tensor, w2: Tensor, top_k: int, norm_topk_prob: bool,
    shared: tuple[Tensor, Tensor, Tensor] | None = None, capacity: int | None = None,
) -> Tensor:
    """The MoE block from its definition: a plain loop over experts.

    x (N, d); router (E, d); w13 (E, 2h, d); w2 (E, d, h); shared = (w13 (2hs, d), w2 (d, hs),
    gate (1, d)) or None -> (N, d). capacity (training only): each expert keeps its first
    `capacity` assignments in token order and drops the rest; None is dropless (inference).
    """
    _, weights, chosen = route(F.linear(x, router), top_k, norm_topk_prob)  # (N, k)
    y = torch.zeros_like(x)
    for e in range(router.shape[0]):
        tok, slot = torch.where(chosen == e)  # token order
        if capacity is not None:
            tok, slot = tok[:capacity], slot[:capacity]
        out = mlp(x[tok], w13[e], w2[e])  # (n_e, d)
        y = y.index_add(0, tok, out * weights[tok, slot, None].to(x.dtype))
    if shared is not None:
        s13, s2, sgate = shared
        y = y + gate_shared(F.linear(x, sgate), mlp(x, s13, s2))
    return y


__all__ = [
    "apply_rope", "attention", "causal_mask", "expert_capacity", "gate_shared", "mlp", "moe",
    "moe_combine", "rms_norm", "rope_inv_freq", "rope_tables", "rotate_half", "route", "swiglu",
    "swiglu_packed",
]
