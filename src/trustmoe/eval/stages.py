"""The metric families of `run_eval`, each a function of an `LM` and the sampled corpus.

Every family runs on every backend; what a backend cannot give (hidden states, routing,
gradients, the full distribution) narrows a family instead of stopping it, and the runner
records why (`Capabilities.limits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trustmoe.eval import calibration as cal
from trustmoe.eval import ood
from trustmoe.eval.corpus import Corpus
from trustmoe.eval.lm import LM
from trustmoe.eval.loglik import Scored
from trustmoe.eval.moe_diag import RoutingCollector, summarize_routing
from trustmoe.eval.tasks import Task, TaskResult
from trustmoe.io import TrustmoeError


@dataclass
class Sizes:
    n_val: int
    n_train: int
    max_tokens: int  # per document
    n_task: int  # instances per built-in task
    n_robust: int  # instances per task under perturbation
    n_attack: int
    attack_subs: int
    attack_candidates: int
    n_calib_docs: int  # per calibration split (fit / test)
    calib_tokens: int  # tokens per calibration document (logits are kept for these)
    n_extract: int = 16  # documents per split for verbatim extraction

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(48, 48, 192, 24, 16, 6, 2, 8, 12, 96, 16)
        return cls(128, 128, 512, 200, 100, 16, 3, 16, 32, 192, 64)


def doc_scores(lm: LM, docs: list[list[int]], routing: RoutingCollector | None = None,
               hidden: bool = True) -> list[Scored]:
    """Whole documents, windows of the model's context advancing by half of it."""
    return lm.loglikelihood_rolling(docs, hidden=hidden and lm.caps.hidden, routing=routing)


def calibration(lm: LM, corpus: Corpus, val: list[Scored], sz: Sizes, seed: int
                ) -> dict[str, Any]:
    """All-token calibration from the summaries; temperature fitted on half the held-out
    documents, tested on the other half; bootstrap intervals over documents."""
    conf = np.concatenate([s.max_prob for s in val])
    correct = np.concatenate([s.greedy for s in val]).astype(np.float64)
    p_true = np.exp(np.concatenate([s.logprobs for s in val]))
    sum_p2 = np.concatenate([s.sum_p2 for s in val])
    all_tokens = cal.summary(conf, correct, p_true, sum_p2)
    groups = np.concatenate([np.full(s.n, i) for i, s in enumerate(val)])
    all_tokens["ece_ci95_low"], all_tokens["ece_ci95_high"] = cal.ece_ci(conf, correct, groups,
                                                                         seed)
    fit_docs = [d[: sz.calib_tokens] for d in corpus.val[0::2][: sz.n_calib_docs]]
    test_docs = [d[: sz.calib_tokens] for d in corpus.val[1::2][: sz.n_calib_docs]]
    if not fit_docs or not test_docs:
        raise TrustmoeError("calibration needs at least 2 held-out documents")
    fit = lm.loglikelihood_rolling(fit_docs, logits=True)
    test = lm.loglikelihood_rolling(test_docs, logits=True)

    def cat(ss: list[Scored]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([s.logits for s in ss if s.logits is not None]),
                torch.from_numpy(np.concatenate([s.targets for s in ss])))

    fz, fy = cat(fit)
    tz, ty = cat(test)
    t = cal.fit_temperature(fz, fy)
    before, after = cal.from_logits(tz, ty, 1.0), cal.from_logits(tz, ty, t)
    test_groups = np.concatenate([np.full(s.n, i) for i, s in enumerate(test)])
    for res, temp in ((before, 1.0), (after, t)):
        c, k = cal.confidence(tz, ty, temp)
        res["ece_ci95_low"], res["ece_ci95_high"] = cal.ece_ci(c, k, test_groups, seed)
    return {"next_token": {"all_tokens": all_tokens, "temperature": t,
                           "fit_tokens": int(fy.numel()), "test_before": before,
                           "test_after": after,
                           "estimated": not lm.caps.exact}}


def robustness(lm: LM, tasks: list[Task], scored: dict[str, TaskResult], sz: Sizes,
               seed: int) -> dict[str, Any]:
    from trustmoe.eval.robustness import robustness as run

    out = {}
    for t in tasks:
        sub = Task(t.name, t.instances[: sz.n_robust])
        base = scored[t.name].correct()[: sz.n_robust]
        out[t.name] = run(lm, sub, seed=seed, base_correct=base)
    return out


def attack(lm: LM, tasks: list[Task], sz: Sizes, seed: int) -> dict[str, Any]:
    from trustmoe.eval.attack import run_attack

    task = next((t for t in tasks if t.name == "next-words"), tasks[0])
    return run_attack(lm, task, n=sz.n_attack, max_subs=sz.attack_subs,
                      n_candidates=sz.attack_candidates, seed=seed)


def ood_family(lm: LM, corpus: Corpus, val: list[Scored], train: list[Scored],
               extra: dict[str, list[str]], sz: Sizes, seed: int
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """OOD metrics per set, and routing per set where the backend exposes routing."""
    feats = [s.hidden for s in train if s.hidden is not None]
    fm = ood.FeatureModel.fit(np.stack(feats)) if len(feats) >= 2 else None
    id_scores = ood.sequence_scores(val, fm)
    val_texts = [corpus.text(d) for d in corpus.val]
    sets: dict[str, list[list[int]]] = {
        "shuffled-tokens": ood.shuffle_tokens(corpus.val, seed),
        "char-noise": [corpus.encode(t)[: sz.max_tokens] for t in ood.char_noise(val_texts, seed)],
    }
    for name, texts in extra.items():
        docs = [corpus.encode(t)[: sz.max_tokens] for t in texts[: sz.n_val]]
        sets[f"ood:{name}"] = [d for d in docs if d]
    scores, routing = {}, {}
    for name, docs in sets.items():
        if not docs:
            raise TrustmoeError(f"OOD set {name} has no tokens after tokenization")
        rc = lm.routing_collector()
        if rc is not None:
            with rc:
                scored = doc_scores(lm, docs, rc)
            routing[name] = summarize_routing(rc)
        else:
            scored = doc_scores(lm, docs)
        scores[name] = ood.sequence_scores(scored, fm)
    result = ood.evaluate_sets(id_scores, scores, seed)
    for name, s in scores.items():  # keep the raw scores of the best detector for histograms
        best = result[name]["best"]
        result[name]["hist"] = {"score": best, "id": id_scores[best].round(5).tolist(),
                                "ood": s[best].round(5).tolist()}
    return result, routing


def pooled_accuracy(results: dict[str, TaskResult], seed: int) -> dict[str, float]:
    """Accuracy over every task instance pooled, with its bootstrap interval."""
    from trustmoe.eval.bootstrap import mean_ci

    acc = np.concatenate([r.correct() for r in results.values()]) if results else np.empty(0)
    lo, hi = mean_ci(acc, seed)
    return {"accuracy": float(acc.mean()) if acc.size else float("nan"),
            "accuracy_ci95_low": lo, "accuracy_ci95_high": hi, "n": int(acc.size)}
