"""Per-request features the monitor compares with a reference profile.

One definition serves three callers: the engine while serving (through `FeatureAccumulator`,
fed from what its prefill already computes), the offline paths (`features_from_model`: eval's
reference profile, `trustmoe monitor replay`, the drift benchmark), and the detectors. A
reference and a live stream therefore measure exactly the same quantities:

- `token_ids`: the prompt as the engine ran it (no BOS added; `Engine.encode` adds none).
- `mean_nll`, `mean_entropy`, `mean_top1`: at the *scored positions* of the prompt
  (`scored_positions`): position t predicts `token_ids[t + 1]`; at most `max_scored` (4)
  evenly spaced positions, so the LM head runs on a bounded number of prompt rows. NaN when
  the prompt has a single token.
- `hidden`: the final-norm hidden state averaged over every prompt position, (d,).
- `routing`: top-k expert assignments per MoE layer over every prompt position, (L, E);
  None for a dense model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from trustmoe.model.transformer import Transformer

MAX_SCORED = 4  # scored prompt positions per request: LM-head rows the features cost (16 cost
# 11.8% of serving tokens/s at 16 clients on bench-small; 4 cost <= 5%, benchmarks/serve_load.py --monitor)


@dataclass
class RequestFeatures:
    """What the monitor knows about one request's prompt (see the module docstring)."""

    token_ids: np.ndarray  # (n,) int64 prompt token ids
    mean_nll: float  # nats per scored token; nan when n_scored == 0
    mean_entropy: float  # nats, entropy of the next-token distribution at scored positions
    mean_top1: float  # mean max-probability at scored positions
    hidden: np.ndarray  # (d,) float32 mean final-norm hidden state over prompt positions
    routing: np.ndarray | None  # (L, E) int64 expert assignments per MoE layer; None if dense
    n_scored: int = 0

    @property
    def prompt_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def check(self, hidden_size: int, routing_shape: tuple[int, int] | None) -> None:
        """Raise ValueError naming the first field that does not fit the profile's model."""
        if self.token_ids.ndim != 1 or self.prompt_tokens < 1:
            raise ValueError(f"token_ids must be a non-empty 1-D array, got shape "
                             f"{self.token_ids.shape}")
        if self.hidden.shape != (hidden_size,):
            raise ValueError(f"hidden has shape {self.hidden.shape}; the profile's model has "
                             f"hidden size {hidden_size}")
        got = None if self.routing is None else tuple(self.routing.shape)
        if got != routing_shape:
            raise ValueError(f"routing has shape {got}; the profile's model has {routing_shape} "
                             "(MoE layers, experts)")
        for name in ("mean_nll", "mean_entropy", "mean_top1"):
            v = getattr(self, name)
            if self.n_scored and not math.isfinite(v):
                raise ValueError(f"{name} is {v} although {self.n_scored} positions were scored")


def scored_positions(n_tokens: int, max_scored: int = MAX_SCORED) -> np.ndarray:
    """Prompt positions t (predicting token t + 1) whose next-token distribution is scored.

    All of 0..n-2 when there are at most `max_scored`; otherwise `max_scored` evenly spaced
    ones, floor((i + 1/2) (n - 1) / max_scored), so long prompts are sampled end to end.
    """
    m = n_tokens - 1
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    if max_scored < 1:
        raise ValueError(f"max_scored must be >= 1, got {max_scored}")
    if m <= max_scored:
        return np.arange(m, dtype=np.int64)
    return np.floor((np.arange(max_scored) + 0.5) * m / max_scored).astype(np.int64)


@torch.no_grad()
def token_stats(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """logits (m, V), targets (m,) -> NLL, entropy (nats) and top-1 probability, each (m,)."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # (m, V)
    nll = -logp.gather(1, targets[:, None].long()).squeeze(1)  # (m,)
    entropy = -(logp.exp() * logp).sum(-1)  # (m,)
    top1 = logp.max(dim=-1).values.exp()  # (m,)
    return nll, entropy, top1


class FeatureAccumulator:
    """Builds one request's features from pieces of its prefill (chunked or whole).

    The engine calls `add_hidden` and `add_routing` for every prompt chunk it runs and
    `add_logits` for the rows `scored_in(start, end)` names, then `finish()`.
    """

    def __init__(self, token_ids: Sequence[int], hidden_size: int, moe_layers: int,
                 num_experts: int, max_scored: int = MAX_SCORED) -> None:
        self.ids = np.asarray(token_ids, dtype=np.int64)  # (n,)
        self.positions = scored_positions(len(self.ids), max_scored)  # (m,)
        self.hidden_sum = torch.zeros(hidden_size, dtype=torch.float64)  # (d,)
        self.hidden_n = 0
        self.routing = np.zeros((moe_layers, num_experts), dtype=np.int64) if moe_layers else None
        self.sums = np.zeros(3, dtype=np.float64)  # nll, entropy, top1
        self.scored = 0

    def scored_in(self, start: int, end: int) -> np.ndarray:
        """Scored positions within prompt positions [start, end)."""
        p = self.positions
        return p[(p >= start) & (p < end)]

    def add_logits(self, positions: np.ndarray, logits: Tensor) -> None:
        # positions: (m,) prompt positions; logits: (m, V) at those positions
        if len(positions) == 0:
            return
        targets = torch.as_tensor(self.ids[np.asarray(positions) + 1], device=logits.device)
        nll, ent, top1 = token_stats(logits, targets)
        self.sums += [float(nll.sum()), float(ent.sum()), float(top1.sum())]
        self.scored += len(positions)

    def add_hidden(self, hidden: Tensor) -> None:
        # hidden: (T, d) final-norm hidden states of T prompt positions
        self.hidden_sum += hidden.detach().double().sum(0).cpu()
        self.hidden_n += int(hidden.shape[0])

    def add_routing(self, layer: int, experts: Tensor) -> None:
        # layer: index among MoE layers; experts: (T, k) selected expert ids of T prompt positions
        if self.routing is None:
            return
        E = self.routing.shape[1]
        self.routing[layer] += torch.bincount(experts.flatten().cpu(), minlength=E).numpy()

    def finish(self) -> RequestFeatures:
        n = self.scored
        means = self.sums / n if n else np.full(3, np.nan)
        hidden = (self.hidden_sum / max(self.hidden_n, 1)).float().numpy()
        return RequestFeatures(token_ids=self.ids, mean_nll=float(means[0]),
                               mean_entropy=float(means[1]), mean_top1=float(means[2]),
                               hidden=hidden, routing=self.routing, n_scored=n)


def model_shape(model: Transformer) -> tuple[int, int, int]:
    """(hidden size, MoE layers, experts) of a model, as the features are shaped."""
    cfg = model.config
    moe_layers = cfg.num_hidden_layers if cfg.is_moe else 0
    return cfg.hidden_size, moe_layers, cfg.num_local_experts if cfg.is_moe else 0


@torch.no_grad()
def features_from_model(model: Transformer, prompts: Sequence[Sequence[int]], *,
                        batch_size: int = 16, max_scored: int = MAX_SCORED) -> list[RequestFeatures]:
    """Features of each prompt from plain forward passes of the torch model (offline use).

    Prompts are sorted by length and right-padded; attention is causal, so padding never
    changes a real position. Prompts longer than the model's context raise ValueError (the
    server refuses them too).
    """
    from trustmoe.model.moe import MoE

    d, L, E = model_shape(model)
    max_pos = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if not 1 <= len(p) <= max_pos:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model takes 1..{max_pos}")
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: list[RequestFeatures | None] = [None] * len(prompts)
    moes = [b.mlp for b in model.layers if isinstance(b.mlp, MoE)]
    captured: list[Tensor] = []
    handles = [m.register_forward_hook(
        lambda _m, _a, o: captured.append(o[1].experts)) for m in moes]  # (B*T, k) each
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(order), batch_size):
            idxs = order[b0:b0 + batch_size]
            T = len(prompts[idxs[0]])
            idx = torch.zeros(len(idxs), T, dtype=torch.long)  # (B, T) right-padded with 0
            for row, i in enumerate(idxs):
                idx[row, :len(prompts[i])] = torch.as_tensor(list(prompts[i]), dtype=torch.long)
            captured.clear()
            res = model.run(idx.to(model.device), return_hidden=True)
            assert res.hidden_states is not None
            experts = [e.view(len(idxs), T, -1) for e in captured]  # L x (B, T, k)
            for row, i in enumerate(idxs):
                n = len(prompts[i])
                acc = FeatureAccumulator(prompts[i], d, L, E, max_scored)
                pos = acc.positions
                acc.add_logits(pos, res.logits[row, torch.as_tensor(pos, dtype=torch.long)])
                acc.add_hidden(res.hidden_states[row, :n])
                for layer, ex in enumerate(experts):
                    acc.add_routing(layer, ex[row, :n])
                out[i] = acc.finish()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [f for f in out if f is not None]


def features_to_arrays(feats: Sequence[RequestFeatures]) -> dict[str, Any]:
    """Stack features into the arrays a profile stores (see `trustmoe.eval.profile`)."""
    lengths = np.array([f.prompt_tokens for f in feats], dtype=np.int64)
    offsets = np.zeros(len(feats) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out: dict[str, Any] = {
        "token_ids": np.concatenate([f.token_ids for f in feats]).astype(np.int64)
        if feats else np.zeros(0, dtype=np.int64),
        "token_offsets": offsets,
        "prompt_tokens": lengths,
        "mean_nll": np.array([f.mean_nll for f in feats], dtype=np.float64),
        "mean_entropy": np.array([f.mean_entropy for f in feats], dtype=np.float64),
        "mean_top1": np.array([f.mean_top1 for f in feats], dtype=np.float64),
        "n_scored": np.array([f.n_scored for f in feats], dtype=np.int64),
        "hidden": np.stack([f.hidden for f in feats]).astype(np.float32)
        if feats else np.zeros((0, 0), dtype=np.float32),
    }
    if feats and feats[0].routing is not None:
        out["routing"] = np.stack([f.routing for f in feats]).astype(np.int64)  # type: ignore[misc]
    return out
