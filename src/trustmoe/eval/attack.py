"""A token-substitution attack on multiple-choice inputs: gradient-guided (HotFlip / GCG style)
where the backend gives gradients, black-box elsewhere.

For one instance, the context tokens are the attack surface. Each step proposes single-token
swaps and evaluates `n_candidates` of them exactly (one log-likelihood query each, through
`LM.loglikelihood`, so any backend can be attacked), keeping the best. It stops on success or
after `max_subs` steps (so at most `max_subs` tokens change). Proposals:
- gradient (torch backend): the gradient of the attack loss with respect to the one-hot
  context tokens ranks, per position, the `top_k` swaps with the most negative gradient (the
  first-order estimate of the loss change); candidates are sampled from those.
- black-box (engine, OpenAI server): candidates are random (position, token) swaps, tokens
  drawn uniformly from the vocabulary (never BOS/EOS) -- greedy random substitution.

Loss (minimised), on the summed choice log-likelihoods ll_j:
- untargeted: ll_gold - max_{j != gold} ll_j  (success when another choice wins, i.e. < 0)
- targeted:   max_{j != t} ll_j - ll_t        (success when the target choice t wins)
Reported with TextAttack's fields: successful / failed / skipped attacks, original accuracy,
accuracy under attack, attack success rate, average perturbed token %, average tokens per
input and average number of queries (one query = one candidate input scored).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from trustmoe.eval.lm import ContinuationRequest
from trustmoe.eval.packed import _layout, pack, predictor_positions
from trustmoe.eval.tasks import Instance, Task, encode_pair, lm_encoder
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.eval.lm import LM
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

    def __init__(self, model: Transformer, conts: list[list[int]], prefix: int) -> None:
        self.model, self.conts, self.prefix = model, conts, prefix

    def batch(self, ctxs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # ctxs: (C, Tc) -> ids, positions (C, T) and attention mask (C, 1, T, T)
        layouts = [_layout(c.tolist(), self.conts, self.prefix) for c in ctxs]
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


def choice_lls(lm: LM, ctxs: list[list[int]], conts: list[list[int]]) -> Tensor:
    """Summed log-likelihood of every choice after every candidate context: (C, n)."""
    reqs = [ContinuationRequest(c, cont) for c in ctxs for cont in conts]
    totals = [s.total for s in lm.loglikelihood(reqs)]
    return torch.tensor(totals, dtype=torch.float64).view(len(ctxs), len(conts))


def attack_instance(
    lm: LM, inst: Instance, *, target: int | None = None, max_subs: int = 3, top_k: int = 16,
    n_candidates: int = 32, seed: int = 0,
) -> Outcome:
    encode = lm_encoder(lm)
    ctx, _ = encode_pair(encode, inst.context, inst.delimiter + inst.choices[0])
    conts = [encode_pair(encode, inst.context, inst.delimiter + c)[1] for c in inst.choices]
    if not ctx:
        return Outcome("skipped", 0, 0, 0, [])
    model = _white_box(lm)
    scorer = _Scorer(model, conts, lm.prefix_id) if model is not None else None
    V = lm.vocab_size
    banned = {lm.prefix_id, *([lm.codec.eos_id] if lm.codec and lm.codec.eos_id is not None
                               else [])}
    cur = torch.tensor(ctx)  # (Tc,)
    rng = random.Random(seed)
    lls0 = choice_lls(lm, [ctx], conts)  # (1, n)
    loss0 = float(_loss(lls0, inst.gold, target)[0])
    before = int(lls0[0].argmax()) == inst.gold
    queries = 1
    if loss0 < 0:  # already wrong (untargeted) or already the target: nothing to attack
        return Outcome("skipped", 0, len(ctx), queries, ctx, before, before)
    Tc = len(ctx)
    lls = lls0
    for _ in range(max_subs):
        if scorer is not None and model is not None:
            grad = _one_hot_grad(model, scorer, cur, inst.gold, target).cpu()  # (Tc, V)
            for b in banned:  # never insert document separators
                grad[:, b] = float("inf")
            grad[torch.arange(Tc), cur] = float("inf")
            top = (-grad).topk(min(top_k, V - 2), dim=1).indices.cpu()  # (Tc, k) best swaps
            pairs = [(p, int(top[p, j])) for p in range(Tc) for j in range(top.shape[1])]
            cands = rng.sample(pairs, min(n_candidates, len(pairs)))
        else:
            cands = _random_swaps(cur, V, banned, n_candidates, rng)
        batch = cur.repeat(len(cands), 1)  # (C, Tc)
        for row, (p, tok) in enumerate(cands):
            batch[row, p] = tok
        cand_lls = choice_lls(lm, batch.tolist(), conts)  # (C, n)
        losses = _loss(cand_lls, inst.gold, target)
        queries += len(cands)
        best = int(losses.argmin())
        cur, lls = batch[best], cand_lls[best: best + 1]
        if float(losses[best]) < 0:
            break
    status = "successful" if float(_loss(lls, inst.gold, target)[0]) < 0 else "failed"
    subs = int((cur != torch.tensor(ctx)).sum())
    return Outcome(status, subs, Tc, queries, cur.tolist(), before,
                   int(lls[0].argmax()) == inst.gold)


def _white_box(lm: LM) -> Transformer | None:
    """The torch module behind `lm` when its backend gives gradients."""
    if not lm.caps.gradients:
        return None
    model = getattr(lm, "model", None)
    from trustmoe.model.transformer import Transformer

    return model if isinstance(model, Transformer) else None


def _random_swaps(cur: Tensor, vocab: int, banned: set[int], n: int, rng: random.Random
                  ) -> list[tuple[int, int]]:
    """n distinct random single-token swaps (position, new token) of the context."""
    Tc = cur.shape[0]
    n = min(n, Tc * max(vocab - len(banned) - 1, 1))
    out: set[tuple[int, int]] = set()
    while len(out) < n:
        p, tok = rng.randrange(Tc), rng.randrange(vocab)
        if tok not in banned and tok != int(cur[p]):
            out.add((p, tok))
    return sorted(out)


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
    lm: LM, task: Task, *, n: int, targeted: bool = False, max_subs: int = 3,
    top_k: int = 16, n_candidates: int = 32, seed: int = 0,
) -> dict[str, Any]:
    """Attack the first n instances; TextAttack's summary fields."""
    if max_subs < 1 or top_k < 1 or n_candidates < 1:
        raise TrustmoeError("attack needs max_subs, top_k and n_candidates >= 1")
    outs = []
    for i, inst in enumerate(task.instances[:n]):
        tgt = None
        if targeted:
            tgt = next(j for j in range(len(inst.choices)) if j != inst.gold)
        outs.append(attack_instance(lm, inst, target=tgt, max_subs=max_subs, top_k=top_k,
                                    n_candidates=n_candidates, seed=seed + i))
    succ = [o for o in outs if o.status == "successful"]
    fail = [o for o in outs if o.status == "failed"]
    attacked = succ + fail
    total = max(len(outs), 1)
    return {
        "task": task.name, "mode": "targeted" if targeted else "untargeted",
        "method": "gradient" if _white_box(lm) is not None else "black-box",
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
