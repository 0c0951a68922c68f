"""MoE diagnostics: where the router sends real tokens, and how that moves between ID and OOD.

`RoutingCollector` attaches forward hooks to every `MoE` layer and accumulates, over real
(non-padding) tokens only: assignments per expert, top-k co-activation counts and the summed
router entropy. `summarize_routing` turns that into tokens per expert, dead-expert fraction,
normalised load entropy, mean router entropy per layer and a co-activation matrix;
`compare_routing` reports per-layer Jensen-Shannon divergence between two load distributions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from trustmoe.model.moe import RouterOutput
    from trustmoe.model.transformer import Transformer


class RoutingCollector:
    """Use as a context manager around `score_requests(..., routing=collector)` calls."""

    def __init__(self, model: Transformer) -> None:
        from trustmoe.model.moe import MoE

        self.moes = [(i, b.mlp) for i, b in enumerate(model.layers) if isinstance(b.mlp, MoE)]
        E = self.moes[0][1].num_experts if self.moes else 1
        L = len(self.moes)
        self.num_experts = E
        self.layers = [i for i, _ in self.moes]
        self.counts = np.zeros((L, E), dtype=np.int64)  # assignments per expert
        self.coact = np.zeros((L, E, E), dtype=np.int64)  # tokens routed to both e1 and e2
        self.entropy_sum = np.zeros(L, dtype=np.float64)  # sum of router entropies (nats)
        self.tokens = np.zeros(L, dtype=np.int64)
        self._mask: Tensor | None = None
        self._handles: list[RemovableHandle] = []

    @property
    def active(self) -> bool:
        return bool(self.moes)

    def set_mask(self, mask: Tensor | None) -> None:
        self._mask = mask  # (N,) bool over the flattened batch, True = real token

    def __enter__(self) -> RoutingCollector:
        for slot, (_, moe) in enumerate(self.moes):
            self._handles.append(moe.register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, slot: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: tuple[Tensor, RouterOutput]) -> None:
            r = output[1]
            experts, probs = r.experts, r.probs  # (N, k), (N, E)
            if self._mask is not None and self._mask.numel() == experts.shape[0]:
                experts, probs = experts[self._mask], probs[self._mask]
            self.add(slot, experts, probs)

        return hook

    @torch.no_grad()
    def add(self, slot: int, experts: Tensor, probs: Tensor) -> None:
        E = self.num_experts
        self.counts[slot] += torch.bincount(experts.flatten(), minlength=E).cpu().numpy()
        onehot = torch.zeros(experts.shape[0], E, device=experts.device)
        onehot.scatter_(1, experts, 1.0)  # (N, E)
        self.coact[slot] += (onehot.T @ onehot).round().long().cpu().numpy()  # (E, E)
        ent = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # (N,)
        self.entropy_sum[slot] += float(ent.double().sum())
        self.tokens[slot] += experts.shape[0]


def summarize_routing(c: RoutingCollector) -> dict[str, Any]:
    """Per-layer routing summary; empty dict for a dense model."""
    if not c.active:
        return {}
    E = c.num_experts
    log_e = math.log(E)
    layers = []
    for slot, layer in enumerate(c.layers):
        counts = c.counts[slot]
        load = counts / max(int(counts.sum()), 1)
        nz = load[load > 0]
        diag = np.diag(c.coact[slot]).astype(np.float64)
        # co-activation: P(e2 chosen | e1 chosen), diagonal zeroed
        co = c.coact[slot] / np.maximum(diag[:, None], 1)
        np.fill_diagonal(co, 0.0)
        layers.append({
            "layer": layer,
            "tokens": int(c.tokens[slot]),
            "tokens_per_expert": counts.tolist(),
            "load": load.tolist(),
            "dead_fraction": float((counts == 0).mean()),
            "load_entropy": float(-(nz * np.log(nz)).sum() / log_e),
            "router_entropy": float(c.entropy_sum[slot] / max(int(c.tokens[slot]), 1) / log_e),
            "coactivation": co.round(6).tolist(),
        })
    return {
        "num_experts": E,
        "layers": layers,
        "dead_fraction": float(np.mean([x["dead_fraction"] for x in layers])),
        "router_entropy": float(np.mean([x["router_entropy"] for x in layers])),
        "load_entropy": float(np.mean([x["load_entropy"] for x in layers])),
    }


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    p = p / max(p.sum(), 1e-12)
    q = q / max(q.sum(), 1e-12)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def compare_routing(id_summary: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """How routing on `other` (e.g. an OOD set) differs from routing on ID data, per layer."""
    if not id_summary or not other:
        return {}
    rows = []
    for a, b in zip(id_summary["layers"], other["layers"], strict=True):
        rows.append({
            "layer": a["layer"],
            "load_js_divergence": js_divergence(np.array(a["load"]), np.array(b["load"])),
            "router_entropy_delta": b["router_entropy"] - a["router_entropy"],
            "dead_fraction_delta": b["dead_fraction"] - a["dead_fraction"],
        })
    return {
        "layers": rows,
        "mean_load_js_divergence": float(np.mean([r["load_js_divergence"] for r in rows])),
        "mean_router_entropy_delta": float(np.mean([r["router_entropy_delta"] for r in rows])),
    }
