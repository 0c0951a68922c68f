"""Perturbations do what they say; worst case is per instance; the attack really flips answers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trustmoe.eval import robustness as rb
from trustmoe.eval.attack import _one_hot_grad, _Scorer, attack_instance, run_attack
from trustmoe.eval.backend_model import score_requests
from trustmoe.eval.loglik import continuation_requests
from trustmoe.eval.tasks import Instance, Task, encode_pair
from trustmoe.io import TrustmoeError


def test_perturbations() -> None:
    rng = random.Random(0)
    text = "It is late and we do not know. The river is wide"
    assert rb.contract(text, rng) == "It's late and we don't know. The river is wide"
    assert rb.lowercase(text, rng) == text.lower()
    spaced = rb.extra_space(text, random.Random(1))
    assert spaced.split() == text.split() and len(spaced) > len(text)
    typo = rb.typos("a" * 2000, random.Random(2), prob=0.1)
    changed = [c for c in typo if c != "a"]
    assert 100 < len(changed) < 300 and set(changed) <= set(rb.NEIGHBOURS["a"])
    code = "def total(items):\n    acc = 0\n    for item in items:\n        acc += item\n    return acc"
    renamed = rb.rename_identifiers(code, random.Random(0))
    assert "total" not in renamed and "acc" not in renamed and "item " not in renamed
    assert "def v" in renamed and "return v" in renamed and "for v" in renamed
    assert rb.rename_identifiers("Just a sentence.", rng) == "Just a sentence."


def test_worst_case_is_per_instance(lm, corpus_docs) -> None:  # type: ignore[no-untyped-def]
    insts = [Instance(d.split("\n")[0], [d.split("\n")[1], "Rain.", "Old man."], 0)
             for d in corpus_docs["val"][:6]]
    task = Task("t", insts)
    res = rb.robustness(lm, task, seed=0, perturbations=("typos", "lowercase"))
    assert set(res["perturbations"]) == {"typos", "lowercase"}
    assert res["worst_case_acc"] <= min(res["acc"], *[p["acc"] for p in
                                                      res["perturbations"].values()])
    # recompute the worst case by hand
    from trustmoe.eval.tasks import score_task

    base = score_task(lm, task).correct()
    worst = base.copy()
    for name in ("typos", "lowercase"):
        worst = np.minimum(worst, score_task(lm, rb.perturb_task(task, name, 0))
                           .correct())
    assert res["worst_case_acc"] == pytest.approx(worst.mean())


def test_scorer_matches_loglik(tiny_model) -> None:  # type: ignore[no-untyped-def]
    ctx, conts = [5, 6, 7, 8, 9], [[10, 11], [12], [13, 14, 15]]
    sc = _Scorer(tiny_model, conts, 0)
    with torch.no_grad():
        lls = sc.forward(torch.tensor([ctx, ctx]))[1]
    ref = [s.total for s in score_requests(tiny_model, continuation_requests(
        [(ctx, c) for c in conts], 256, 0))]
    np.testing.assert_allclose(lls.numpy(), ref, atol=1e-4)


def test_one_hot_gradient_is_first_order_change(tiny_model) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    conts = [[10, 11], [12, 40]]
    sc = _Scorer(tiny_model, conts, 0)
    cur = torch.tensor([5, 6, 7, 8, 9])
    g = _one_hot_grad(tiny_model, sc, cur, 0, None)
    assert g.shape == (5, 512)
    # directional derivative along a small embedding move equals <grad, delta one-hot>
    W = tiny_model.embed_tokens.weight
    p, a, b = 2, int(cur[2]), 77
    eps = 1e-3
    from trustmoe.eval.attack import _loss

    def loss_at(alpha: float) -> float:
        def hook(m, args, out):  # type: ignore[no-untyped-def]
            out = out.clone()
            out[:, 1 + p] = W[a] + alpha * (W[b] - W[a])
            return out

        h = tiny_model.embed_tokens.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return float(_loss(sc.forward(cur[None]), 0, None)[0])
        finally:
            h.remove()

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert fd == pytest.approx(float(g[p, b] - g[p, a]), rel=0.05, abs=1e-3)


def test_attack_flips_answers(tiny_model, lm, enc, corpus_docs) -> None:  # type: ignore[no-untyped-def]
    from trustmoe.eval.tasks import score_task

    insts = []
    for d in corpus_docs["val"][:6]:
        w = d.split()
        insts.append(Instance(" ".join(w[:6]), [w[6], "river", "stone", "valley"], 0))
    # make the model's own answer the gold one, so every instance is attackable
    for inst, ll in zip(insts, score_task(lm, Task("t", insts)).lls, strict=True):
        inst.gold = int(np.argmax(ll))
    task = Task("t", insts)
    res = run_attack(lm, task, n=6, max_subs=3, n_candidates=24)
    assert res["method"] == "gradient"
    assert res["skipped_attacks"] == 0 and res["original_accuracy"] == 1.0
    assert res["successful_attacks"] >= 3
    assert res["accuracy_under_attack"] == res["failed_attacks"] / 6
    assert res["attack_success_rate"] == res["successful_attacks"] / 6
    assert 1 <= res["avg_substituted_tokens"] <= 3
    tgt = run_attack(lm, task, n=6, max_subs=3, n_candidates=24, targeted=True)
    assert tgt["mode"] == "targeted" and tgt["successful_attacks"] >= 1
    n_checked = 0
    for inst in insts:
        o = attack_instance(lm, inst, max_subs=3, n_candidates=24)
        if o.status != "successful":
            continue
        # independent check with the primitive: the adversarial context makes another choice win
        conts = [encode_pair(enc, inst.context, " " + c)[1] for c in inst.choices]
        lls = [s.total for s in score_requests(tiny_model, continuation_requests(
            [(o.adversarial, c) for c in conts], 256, 0))]
        assert int(np.argmax(lls)) != inst.gold
        assert 1 <= o.substituted <= 3 and o.queries > 1
        assert sum(a != b for a, b in zip(o.adversarial, enc(inst.context), strict=True)) \
            == o.substituted
        n_checked += 1
    assert n_checked >= 3
    with pytest.raises(TrustmoeError):
        run_attack(lm, task, n=1, max_subs=0)
