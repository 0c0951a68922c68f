"""Shared-context scoring: one forward pass per context, however many continuations it has.

Multiple-choice items score several continuations after the same context. Instead of running
the context once per choice, the item is packed into one sequence

    [BOS] ctx_1 .. ctx_m | cont_1 tokens | cont_2 tokens | ... | cont_n tokens

with positions restarting at m + 1 for every continuation and an attention mask in which each
continuation token sees the context and the earlier tokens of its own continuation only (a
small tree-attention mask). Every scored log-probability is then exactly the one a separate
request would give (up to float noise, tested), at roughly 1/n of the context cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trustmoe.eval.loglik import Scored, scored_slice, stats, to_host
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.eval.moe_diag import RoutingCollector
    from trustmoe.model.transformer import Transformer

Group = tuple[list[int], list[list[int]]]  # (context ids without BOS, continuations)


def _layout(ctx: list[int], conts: list[list[int]], prefix: int
            ) -> tuple[list[int], list[int], list[int]]:
    """Packed ids, positions and the owner of each token (-1 = context, j = continuation j).
    `prefix` is the model's BOS (`LM.prefix_id`)."""
    ids, pos, owner = [prefix, *ctx], list(range(len(ctx) + 1)), [-1] * (len(ctx) + 1)
    for j, c in enumerate(conts):
        ids += c
        pos += list(range(len(ctx) + 1, len(ctx) + 1 + len(c)))
        owner += [j] * len(c)
    return ids, pos, owner


def _truncate(ctx: list[int], conts: list[list[int]], max_len: int) -> list[int]:
    """Drop context tokens from the left so that BOS + context + longest continuation fits."""
    longest = max(len(c) for c in conts)
    if longest + 2 > max_len:
        raise TrustmoeError(f"a continuation of {longest} tokens does not fit the context")
    keep = max_len - 1 - longest
    return ctx[-keep:] if len(ctx) > keep else ctx


def pack(packs: Sequence[tuple[list[int], list[int], list[int]]]
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-pad packed layouts: ids, positions (B, T), mask (B, T, T), owner (B, T)."""
    B, T = len(packs), max(len(p[0]) for p in packs)
    ids = torch.zeros((B, T), dtype=torch.long)  # padding id: never attended to by real rows
    pos = torch.zeros(B, T, dtype=torch.long)
    owner = torch.full((B, T), -2, dtype=torch.long)  # -2 = padding
    for b, (i, p, o) in enumerate(packs):
        n = len(i)
        ids[b, :n], pos[b, :n], owner[b, :n] = torch.tensor(i), torch.tensor(p), torch.tensor(o)
    q_own, k_own = owner[:, :, None], owner[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]  # (1, T, T)
    # a real token sees the context and its own continuation (causally); padding sees itself
    mask = causal & (k_own >= -1) & ((k_own == -1) | (k_own == q_own))
    mask |= torch.eye(T, dtype=torch.bool)[None]
    return ids, pos, mask, owner


def predictor_positions(n_ctx: int, conts: Sequence[Sequence[int]]) -> list[list[int]]:
    """For continuation j, the packed index whose logits predict each of its tokens.

    n_ctx counts BOS + context; the first token is predicted by the last context token,
    the others by the previous token of the same continuation.
    """
    out, start = [], n_ctx
    for c in conts:
        out.append([n_ctx - 1, *range(start, start + len(c) - 1)])
        start += len(c)
    return out


@torch.no_grad()
def score_groups(
    model: Transformer, groups: Sequence[Group], *, prefix: int, batch_size: int = 8,
    routing: RoutingCollector | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[Scored]]:
    """For each (context, continuations) group, one `Scored` per continuation."""
    max_pos = model.config.max_position_embeddings
    prepared = []
    for i, (ctx, conts) in enumerate(groups):
        if not conts or any(len(c) == 0 for c in conts):
            raise TrustmoeError(f"group {i} has an empty continuation")
        prepared.append(_layout(_truncate(ctx, conts, max_pos), conts, prefix))
    order = sorted(range(len(groups)), key=lambda i: (-len(prepared[i][0]), i))
    out: list[list[Scored]] = [[] for _ in groups]
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(order), batch_size):
            idxs = order[b0:b0 + batch_size]
            _batch(model, [prepared[i] for i in idxs], [groups[i][1] for i in idxs],
                   idxs, out, routing)
            if on_batch is not None:
                on_batch(len(idxs))
    finally:
        model.train(was_training)
    return out


def _batch(model: Transformer, packs: list[tuple[list[int], list[int], list[int]]],
           conts: list[list[list[int]]], idxs: list[int], out: list[list[Scored]],
           routing: RoutingCollector | None) -> None:
    dev = model.device
    ids, pos, mask, owner = pack(packs)
    real = owner >= -1
    if routing is not None:
        routing.set_mask(real.flatten().to(dev))
    logits = model.run(ids.to(dev), positions=pos.to(dev), attn_mask=mask[:, None].to(dev)).logits
    if routing is not None:
        routing.set_mask(None)
    rows, src, spans = [], [], []
    for b, (_i, _p, o) in enumerate(packs):
        n_ctx = o.count(-1)
        start = n_ctx
        for cont, prev in zip(conts[b], predictor_positions(n_ctx, conts[b]), strict=True):
            rows += [b] * len(cont)
            src += prev
            spans.append((b, start, len(cont)))
            start += len(cont)
    rr, ss = torch.tensor(rows, device=dev), torch.tensor(src, device=dev)
    tgt_pos = torch.tensor([s + k for (_b, s, n) in spans for k in range(n)], device=dev)
    z = logits[rr, ss]  # (n_scored, V)
    targets = ids.to(dev)[rr, tgt_pos]
    host = to_host(stats(z, targets))
    tg = targets.cpu().numpy()
    off = 0
    for (b, _s, n) in spans:
        out[idxs[b]].append(scored_slice(host, tg, slice(off, off + n)))
        off += n
