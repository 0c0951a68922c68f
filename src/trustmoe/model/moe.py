"""Mixture-of-Experts feed-forward: router -> fp32 softmax -> top-k -> sorted, dropless experts.

Routing, the SwiGLU maths and the shared-expert gate are `trustmoe.model.functional`'s.
Expert weights are stacked (E, ...) tensors. This module's fast path sorts tokens by expert
so that every expert's tokens form one contiguous block and run as one matmul (with a custom
backward); the only Python loop is over experts, never over tokens. `tests/model/test_moe.py`
proves it equal, output and gradients, to the plain loop-over-experts `functional.moe`.

`capacity_factor` is training-only: in `train()` mode each expert keeps its first
`capacity` assignments and drops the rest; in `eval()` mode (and in the engine, which has
no such option) the layer is dropless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmoe.config import ModelConfig
from trustmoe.model import functional as tf


@dataclass
class RouterOutput:
    logits: Tensor  # (N, E) router logits, fp32
    probs: Tensor  # (N, E) softmax, fp32
    weights: Tensor  # (N, k) combine weights (renormalised if norm_topk_prob)
    experts: Tensor  # (N, k) selected expert ids
    counts: Tensor  # (E,) assignments per expert (before any capacity drop)
    dropped: int = 0  # assignments dropped by the capacity factor


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP with HF Llama parameter names."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(tf.swiglu(self.gate_proj(x), self.up_proj(x)))


def expert_ffn(xs: Tensor, w13: Tensor, w2: Tensor, counts: list[int]) -> Tensor:
    """SwiGLU experts over expert-sorted rows: block e of `xs` (counts[e] rows) uses expert e.

    xs: (M, d), w13: (E, 2h, d) = [gate; up], w2: (E, d, h) -> (M, d). Same maths as
    `F.linear(silu(xs_e @ w1.T) * (xs_e @ w3.T), w2[e])` per block; the custom backward writes
    each expert's weight gradient straight into its slice of one (E, ...) buffer instead of
    materialising a full-size zero gradient per expert (what `w13[e]` indexing costs autograd).
    """
    out = _ExpertFFN.apply(xs, w13, w2, counts)
    assert isinstance(out, Tensor)
    return out


def _compute_dtype(t: Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev) and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, xs: Tensor, w13: Tensor, w2: Tensor, counts: list[int]
    ) -> Tensor:
        dt = _compute_dtype(xs)
        ctx.dtypes = (xs.dtype, w13.dtype, w2.dtype)
        x, a13, a2 = xs.to(dt), w13.to(dt), w2.to(dt)
        M, h = x.shape[0], w2.shape[-1]
        with torch.autocast(xs.device.type, enabled=False):
            gu = x.new_empty(M, 2 * h)  # (M, 2h) gate|up pre-activations
            for e, (s, n) in enumerate(_blocks(counts)):
                torch.mm(x[s:s + n], a13[e].t(), out=gu[s:s + n])
            silu = F.silu(gu[:, :h])  # (M, h), kept for backward
            act = silu * gu[:, h:]  # (M, h) == tf.swiglu(gate, up)
            y = x.new_empty(M, w2.shape[1])  # (M, d)
            for e, (s, n) in enumerate(_blocks(counts)):
                torch.mm(act[s:s + n], a2[e].t(), out=y[s:s + n])
        ctx.counts = counts
        ctx.save_for_backward(x, a13, a2, gu, silu)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, a13, a2, gu, silu = ctx.saved_tensors
        counts: list[int] = ctx.counts
        gy = gy.to(x.dtype).contiguous()  # (M, d)
        h = a2.shape[-1]
        g, u = gu[:, :h], gu[:, h:]
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        act = silu * u  # (M, h), recomputed rather than saved
        gact = torch.empty_like(silu)  # (M, h)
        gw2 = torch.empty_like(a2) if need_w2 else None  # (E, d, h)
        blocks = list(enumerate(_blocks(counts)))
        for e, (s, n) in blocks:
            torch.mm(gy[s:s + n], a2[e], out=gact[s:s + n])
            if gw2 is not None:
                torch.mm(gy[s:s + n].t(), act[s:s + n], out=gw2[e])  # n == 0 -> zeros
        ggu = torch.empty_like(gu)  # (M, 2h) = [d gate; d up]
        ggu[:, :h] = torch.ops.aten.silu_backward(gact * u, g)
        torch.mul(gact, silu, out=ggu[:, h:])
        gx = torch.empty_like(x) if need_x else None  # (M, d)
        gw13 = torch.empty_like(a13) if need_w13 else None  # (E, 2h, d)
        for e, (s, n) in blocks:
            if gx is not None:
                torch.mm(ggu[s:s + n], a13[e], out=gx[s:s + n])
            if gw13 is not None:
                torch.mm(ggu[s:s + n].t(), x[s:s + n], out=gw13[e])
        dx, d13, d2 = ctx.dtypes
        return (
            None if gx is None else gx.to(dx),
            None if gw13 is None else gw13.to(d13),
            None if gw2 is None else gw2.to(d2),
            None,
        )


def _blocks(counts: list[int]) -> list[tuple[int, int]]:
    """(start, length) of every expert's block of sorted rows, in expert order."""
    out, s = [], 0
    for n in counts:
        out.append((s, n))
        s += n
    return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        self.num_experts, self.top_k, self.hidden = E, cfg.num_experts_per_tok, h
        self.norm_topk_prob = cfg.norm_topk_prob
        self.capacity_factor = cfg.capacity_factor
        self.gate = nn.Linear(d, E, bias=False)
        # w13 stacks gate (w1) and up (w3) projections: one matmul per expert block
        self.w13 = nn.Parameter(torch.empty(E, 2 * h, d))  # (E, 2h, d)
        self.w2 = nn.Parameter(torch.empty(E, d, h))  # (E, d, h)
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)
        self.shared_expert: SwiGLU | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(d, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def route(self, x: Tensor) -> RouterOutput:
        # x: (N, d)
        logits = self.gate(x).float()  # (N, E)
        probs, weights, experts = tf.route(logits, self.top_k, self.norm_topk_prob)  # (N, E), (N, k) x2
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)  # (E,)
        return RouterOutput(logits, probs, weights, experts, counts)

    def forward(self, x: Tensor) -> tuple[Tensor, RouterOutput]:
        # x: (B, T, d) -> (B, T, d)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        r = self.route(x)
        y = self.experts_forward(x, r)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            y = y + tf.gate_shared(self.shared_expert_gate(x), self.shared_expert(x))
        return y.view(shape), r

    def experts_forward(self, x: Tensor, r: RouterOutput) -> Tensor:
        # x: (N, d); sorted dropless dispatch -> (N, d)
        N, k = r.experts.shape
        flat_expert = r.experts.flatten()  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # (N*k,) assignments grouped by expert
        counts = r.counts
        if self.capacity_factor is not None and self.training:  # training-only token dropping
            order, counts, r.dropped = self._apply_capacity(order, flat_expert, counts, N * k)
        token = order // k  # (M,) source token of each sorted assignment
        gate_w = r.weights.flatten()[order].to(x.dtype)  # (M,)
        xs = x.index_select(0, token)  # (M, d) contiguous per expert
        ys = expert_ffn(xs, self.w13, self.w2, counts.tolist())  # (M, d)
        ys = ys * gate_w[:, None]  # (M, d)
        return x.new_zeros(x.shape).index_add_(0, token, ys)  # (N, d)

    def _apply_capacity(
        self, order: Tensor, flat_expert: Tensor, counts: Tensor, assignments: int
    ) -> tuple[Tensor, Tensor, int]:
        """Keep each expert's first `capacity` assignments in token order; drop the rest."""
        assert self.capacity_factor is not None
        capacity = tf.expert_capacity(self.capacity_factor, assignments, self.num_experts)
        starts = torch.cumsum(counts, 0) - counts  # (E,)
        sorted_expert = flat_expert[order]  # (M,)
        rank = torch.arange(order.numel(), device=order.device) - starts[sorted_expert]
        keep = rank < capacity
        kept_counts = counts.clamp(max=capacity)
        return order[keep], kept_counts, int((~keep).sum())


def load_balancing_loss(r: RouterOutput) -> Tensor:
    """Switch Transformer auxiliary loss: E * sum_e f_e * P_e (1.0 when perfectly balanced)."""
    E = r.probs.shape[-1]
    f = r.counts.float() / r.counts.sum().clamp(min=1)  # (E,) fraction of assignments
    p = r.probs.mean(dim=0)  # (E,) mean router probability
    return E * torch.sum(f * p)


def router_z_loss(r: RouterOutput) -> Tensor:
    """ST-MoE z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(r.logits, dim=-1).pow(2).mean()


@dataclass
class RoutingStats:
    tokens_per_expert: list[int]
    dead_fraction: float  # experts that received no token
    load_entropy: float  # entropy of the load distribution / log(E); 1.0 = perfectly even
    router_entropy: float  # mean per-token router entropy / log(E)
    dropped: int

    def to_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


@torch.no_grad()
def routing_stats(r: RouterOutput) -> RoutingStats:
    E = r.counts.numel()
    counts = r.counts.float()
    load = counts / counts.sum().clamp(min=1)
    log_e = math.log(E) if E > 1 else 1.0
    load_ent = float(-(load * load.clamp(min=1e-12).log()).sum()) / log_e
    tok_ent = -(r.probs * r.probs.clamp(min=1e-12).log()).sum(-1).mean()
    return RoutingStats(
        tokens_per_expert=[int(c) for c in r.counts.tolist()],
        dead_fraction=float((r.counts == 0).float().mean()),
        load_entropy=load_ent,
        router_entropy=float(tok_ent) / log_e,
        dropped=r.dropped,
    )
