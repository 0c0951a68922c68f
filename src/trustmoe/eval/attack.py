"""A gradient-guided token-substitution attack on multiple-choice inputs (HotFlip / GCG style).

For one instance, the context tokens are the attack surface. Each step takes the gradient of
the attack loss with respect to the one-hot context tokens, keeps for every position the
`top_k` substitutions with the most negative gradient (the first-order estimate of the loss
change), evaluates `n_candidates` of those single swaps exactly, and keeps the best. It stops
on success or after `max_subs` steps (so at most `max_subs` tokens change).

Loss (minimised), on the summed choice log-likelihoods ll_j:
- untargeted: ll_gold - max_{j != gold} ll_j  (success when another choice wins, i.e. < 0)
- targeted:   max_{j != t} ll_j - ll_t        (success when the target choice t wins)
Reported with TextAttack's fields: successful / failed / skipped attacks, original accuracy,
accuracy under attack, attack success rate, average perturbed token %, average tokens per
input and average number of queries (one query = one candidate input scored).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from trustmoe.eval.loglik import BOS_ID
from trustmoe.eval.packed import _layout, pack, predictor_positions
from trustmoe.eval.tasks import Instance, Task, encode_pair
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.model.transformer import Transformer


@dataclass
class Outcome:
    status: str  # "successful" | "failed" | "skipped"
    substituted: int
    tokens: int  # context tokens (the attack surface)
    queries: int
    adversarial: list[int]
    correct_before: bool = False
    correct_after: bool = False


class _Scorer:
    """Scores all choices of one instance for a batch of candidate contexts.

    Each candidate is one packed sequence (`packed`): [BOS] context cont_1 .. cont_n with a
    tree attention mask, so the context runs once for all choices.
    """

    def __init__(self, model: Transformer, conts: list[list[int]]) -> None:
        self.model, self.conts = model, conts

    def batch(self, ctxs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # ctxs: (C, Tc) -> ids, positions (C, T) and attention mask (C, 1, T, T)
        layouts = [_layout(c.tolist(), self.conts) for c in ctxs]
        ids, pos, mask, _owner = pack(layouts)
        dev = self.model.device
        return ids.to(dev), pos.to(dev), mask[:, None].to(dev)

    def forward(self, ctxs: Tensor) -> Tensor:
        """Summed log-likelihood of every choice for every candidate context: (C, n)."""
        ids, pos, mask = self.batch(ctxs)
        return self.lls(self.model.run(ids, positions=pos, attn_mask=mask).logits, ids)

    def lls(self, logits: Tensor, ids: Tensor) -> Tensor:
        # logits: (C, T, V) -> (C, n)
        n_ctx = ids.shape[1] - sum(len(c) for c in self.conts)
        logp = logits.float().log_softmax(-1)  # (C, T, V)
        out, start = [], n_ctx
        for cont, prev in zip(self.conts, predictor_positions(n_ctx, self.conts), strict=True):
            tgt = ids[:, start:start + len(cont)]  # (C, len)
            out.append(logp[:, prev].gather(2, tgt[:, :, None]).squeeze(2).sum(1))
            start += len(cont)
        return torch.stack(out, 1)


def _loss(lls: Tensor, gold: int, target: int | None) -> Tensor:
    # lls: (C, n) -> (C,)
    if target is None:
        others = torch.cat([lls[:, :gold], lls[:, gold + 1:]], 1)
        return lls[:, gold] - others.max(1).values
    others = torch.cat([lls[:, :target], lls[:, target + 1:]], 1)
    return others.max(1).values - lls[:, target]


def attack_instance(
    model: Transformer, encode: Callable[[str], list[int]], inst: Instance, *,
    target: int | None = None, max_subs: int = 3, top_k: int = 16, n_candidates: int = 32,
    seed: int = 0,
) -> Outcome:
    ctx, _ = encode_pair(encode, inst.context, inst.delimiter + inst.choices[0])
    conts = [encode_pair(encode, inst.context, inst.delimiter + c)[1] for c in inst.choices]
    if not ctx:
        return Outcome("skipped", 0, 0, 0, [])
    scorer = _Scorer(model, conts)
    emb = model.embed_tokens
    V = emb.weight.shape[0]
    cur = torch.tensor(ctx)  # (Tc,)
    rng = random.Random(seed)
    with torch.no_grad():
        lls0 = scorer.forward(cur[None])  # (1, n)
    loss0 = float(_loss(lls0, inst.gold, target)[0])
    before = int(lls0[0].argmax()) == inst.gold
    queries = 1
    if loss0 < 0:  # already wrong (untargeted) or already the target: nothing to attack
        return Outcome("skipped", 0, len(ctx), queries, ctx, before, before)
    Tc = len(ctx)
    for _ in range(max_subs):
        grad = _one_hot_grad(model, scorer, cur, inst.gold, target).cpu()  # (Tc, V)
        grad[:, BOS_ID] = float("inf")  # never insert document separators
        grad[torch.arange(Tc), cur] = float("inf")
        top = (-grad).topk(min(top_k, V - 2), dim=1).indices.cpu()  # (Tc, k) best swaps
        pairs = [(p, int(top[p, j])) for p in range(Tc) for j in range(top.shape[1])]
        cands = rng.sample(pairs, min(n_candidates, len(pairs)))
        batch = cur.repeat(len(cands), 1)  # (C, Tc)
        for row, (p, tok) in enumerate(cands):
            batch[row, p] = tok
        with torch.no_grad():
            losses = _loss(scorer.forward(batch), inst.gold, target)
        queries += len(cands)
        best = int(losses.argmin())
        cur = batch[best]
        if float(losses[best]) < 0:
            break
    with torch.no_grad():
        lls = scorer.forward(cur[None])  # (1, n)
    status = "successful" if float(_loss(lls, inst.gold, target)[0]) < 0 else "failed"
    subs = int((cur != torch.tensor(ctx)).sum())
    return Outcome(status, subs, Tc, queries, cur.tolist(), before,
                   int(lls[0].argmax()) == inst.gold)


def _one_hot_grad(model: Transformer, scorer: _Scorer, cur: Tensor, gold: int,
                  target: int | None) -> Tensor:
    """d loss / d one-hot(context) through an embedding hook: (Tc, V)."""
    emb = model.embed_tokens
    W = emb.weight  # (V, d)
    Tc = cur.shape[0]
    one_hot = torch.zeros(Tc, W.shape[0], dtype=W.dtype, device=W.device)
    one_hot[torch.arange(Tc, device=W.device), cur.to(W.device)] = 1.0
    one_hot.requires_grad_(True)

    def hook(module: torch.nn.Module, args: Any, out: Tensor) -> Tensor:
        out = out.clone()  # (1, T, d)
        out[:, 1:1 + Tc] = (one_hot @ W)[None]
        return out

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    handle = emb.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            loss = _loss(scorer.forward(cur[None]), gold, target)[0]
            (grad,) = torch.autograd.grad(loss, one_hot)
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return grad.detach().clone()


def run_attack(
    model: Transformer, encode: Callable[[str], list[int]], task: Task, *, n: int,
    targeted: bool = False, max_subs: int = 3, top_k: int = 16, n_candidates: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Attack the first n instances; TextAttack's summary fields."""
    if max_subs < 1 or top_k < 1 or n_candidates < 1:
        raise TrustmoeError("attack needs max_subs, top_k and n_candidates >= 1")
    model.eval()
    outs = []
    for i, inst in enumerate(task.instances[:n]):
        tgt = None
        if targeted:
            tgt = next(j for j in range(len(inst.choices)) if j != inst.gold)
        outs.append(attack_instance(model, encode, inst, target=tgt, max_subs=max_subs,
                                    top_k=top_k, n_candidates=n_candidates, seed=seed + i))
    succ = [o for o in outs if o.status == "successful"]
    fail = [o for o in outs if o.status == "failed"]
    attacked = succ + fail
    total = max(len(outs), 1)
    return {
        "task": task.name, "mode": "targeted" if targeted else "untargeted",
        "max_substitutions": max_subs,
        "successful_attacks": len(succ), "failed_attacks": len(fail),
        "skipped_attacks": len(outs) - len(attacked),
        "original_accuracy": sum(o.correct_before for o in outs) / total,
        "accuracy_under_attack": sum(o.correct_after for o in outs) / total,
        "attack_success_rate": len(succ) / len(attacked) if attacked else float("nan"),
        "avg_perturbed_token_pct": float(np.mean([100 * o.substituted / o.tokens for o in succ]))
        if succ else float("nan"),
        "avg_substituted_tokens": float(np.mean([o.substituted for o in succ]))
        if succ else float("nan"),
        "avg_tokens_per_input": float(np.mean([o.tokens for o in outs])) if outs else 0.0,
        "avg_num_queries": float(np.mean([o.queries for o in attacked])) if attacked
        else float("nan"),
    }
