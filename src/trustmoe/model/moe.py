"""Mixture-of-Experts feed-forward: router -> fp32 softmax -> top-k -> sorted, dropless experts.

Expert weights are stacked (E, ...) tensors. Tokens are sorted by expert so that every
expert's tokens form one contiguous block and run as one matmul; the only Python loop is
over experts, never over tokens. `tests/model/test_moe.py` holds the plain reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmoe.config import ModelConfig


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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        probs = logits.softmax(dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k), (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)  # (E,)
        return RouterOutput(logits, probs, weights, experts, counts)

    def forward(self, x: Tensor) -> tuple[Tensor, RouterOutput]:
        # x: (B, T, d) -> (B, T, d)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        r = self.route(x)
        y = self.experts_forward(x, r)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(shape), r

    def experts_forward(self, x: Tensor, r: RouterOutput) -> Tensor:
        # x: (N, d); sorted dropless dispatch -> (N, d)
        N, k = r.experts.shape
        flat_expert = r.experts.flatten()  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # (N*k,) assignments grouped by expert
        counts = r.counts
        if self.capacity_factor is not None:
            order, counts, r.dropped = self._apply_capacity(order, flat_expert, counts, N * k)
        token = order // k  # (M,) source token of each sorted assignment
        gate_w = r.weights.flatten()[order].to(x.dtype)  # (M,)
        xs = x[token]  # (M, d) contiguous per expert
        outs = []
        for e, chunk in enumerate(torch.split(xs, counts.tolist())):
            if chunk.shape[0] == 0:
                continue
            g, u = F.linear(chunk, self.w13[e]).chunk(2, dim=-1)  # (n_e, h) each
            outs.append(F.linear(F.silu(g) * u, self.w2[e]))  # (n_e, d)
        if not outs:
            return torch.zeros_like(x)
        ys = torch.cat(outs) * gate_w[:, None]  # (M, d)
        return torch.zeros_like(x).index_add_(0, token, ys)  # (N, d)

    def _apply_capacity(
        self, order: Tensor, flat_expert: Tensor, counts: Tensor, assignments: int
    ) -> tuple[Tensor, Tensor, int]:
        """Keep each expert's first `capacity` assignments in token order; drop the rest."""
        assert self.capacity_factor is not None
        capacity = max(1, math.ceil(self.capacity_factor * assignments / self.num_experts))
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
