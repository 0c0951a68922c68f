"""`run_eval`: one model dir + one dataset dir -> `eval.json`, `report.html`, plots.

Every number comes from the one primitive, `loglik`/`score_requests`: one pass over held-out
documents feeds perplexity, next-token calibration, the OOD in-distribution side, membership
non-members and ID routing; one pass over training documents feeds the OOD feature model and
membership members. Sample sizes are fixed by `quick` and the seed, so two runs give the same
numbers; batch size changes nothing beyond float noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmoe.eval import calibration as cal
from trustmoe.eval import membership as mia
from trustmoe.eval import ood
from trustmoe.eval.corpus import Corpus, load_corpus, read_texts
from trustmoe.eval.loglik import Scored, loglik
from trustmoe.eval.moe_diag import RoutingCollector, compare_routing, summarize_routing
from trustmoe.eval.profile import write_eval_profile
from trustmoe.eval.tasks import Task, builtin_tasks, load_task_file, perplexity, score_task
from trustmoe.io import TrustmoeError, atomic_dir, read_json, sha256_file


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

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(48, 48, 192, 24, 16, 6, 2, 8, 12, 96)
        return cls(128, 128, 512, 200, 100, 16, 3, 16, 32, 192)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class _Stages:
    """A rich progress bar over named stages (or silence)."""

    def __init__(self, names: Sequence[str], show: bool) -> None:
        self.timing: dict[str, float] = {}
        self._p: Any = None
        if show:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(),
                               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                               transient=False)
            self._p.start()
            self._id = self._p.add_task("", total=len(names))

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if self._p is not None:
            self._p.update(self._id, description=name)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timing[name] = round(time.perf_counter() - t0, 3)
            if self._p is not None:
                self._p.advance(self._id)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def _scores(model: Any, docs: list[list[int]], bs: int, window: int, routing: Any = None,
            hidden: bool = True) -> list[Scored]:
    return loglik(model, docs, batch_size=bs, max_len=window, stride=max(1, window // 2),
                  return_hidden=hidden, routing=routing)


def run_eval(
    model_dir: Path, data_dir: Path, out_dir: Path, *, quick: bool = False,
    progress: bool = True, task_files: Sequence[Path] = (), ood_sets: Sequence[Path] = (),
    compare: Path | None = None, seed: int = 0, batch_size: int = 16,
    store_temperature: bool = True, device: str | None = None, sizes: Sizes | None = None,
) -> dict[str, Any]:
    """Evaluate a model; write `out_dir/eval.json` + `report.html`; return a short summary."""
    from trustmoe.model.hf import load

    model_dir, data_dir, out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
    if batch_size < 1:
        raise TrustmoeError(f"batch size must be >= 1, got {batch_size}")
    _check_out_dir(out_dir, model_dir, data_dir)
    tasks_in = [load_task_file(Path(p)) for p in task_files]  # fail fast on bad input
    ood_in = {Path(p).stem or str(p): read_texts(Path(p)) for p in ood_sets}
    other = read_json(Path(compare) / "eval.json", "comparison eval.json") if compare else None
    model = load(model_dir, device=device)
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.exists():
        tok_path = data_dir / "tokenizer.json"
        if not tok_path.exists():
            raise TrustmoeError(f"no tokenizer.json in {model_dir} or {data_dir}")
    torch.manual_seed(seed)
    sz = sizes or Sizes.for_mode(quick)
    window = model.config.max_position_embeddings
    stages = _Stages(["load data", "held-out pass", "training pass", "calibration", "tasks",
                      "robustness", "attack", "ood", "membership", "report", "profile"], progress)
    res: dict[str, Any] = {"schema": 1}
    try:
        corpus: Corpus = stages.run("load data", lambda: load_corpus(
            data_dir, tok_path, n_train=sz.n_train, n_val=sz.n_val, seed=seed,
            max_tokens=sz.max_tokens))
        if len(corpus.val) < 4 or len(corpus.train) < 2:
            raise TrustmoeError(f"{data_dir} has too few documents to evaluate "
                                f"({len(corpus.val)} held-out, {len(corpus.train)} training)")
        val_texts = [corpus.text(d) for d in corpus.val]
        rc_id = RoutingCollector(model)
        with rc_id:
            val = stages.run("held-out pass", lambda: _scores(model, corpus.val, batch_size,
                                                               window, rc_id))
        train = stages.run("training pass", lambda: _scores(model, corpus.train, batch_size,
                                                             window))
        res["perplexity"] = perplexity(val, val_texts)
        res["calibration"] = stages.run("calibration", lambda: _calibration(
            model, corpus, val, sz, batch_size))
        res["calibration"]["next_token"]["stored_in_model_dir"] = store_temperature
        enc = corpus.encode
        tasks = builtin_tasks(corpus, sz.n_task, seed) + tasks_in
        if not tasks:
            raise TrustmoeError("no multiple-choice tasks: held-out documents are too short")
        scored_tasks = stages.run("tasks", lambda: {
            t.name: score_task(model, enc, t, batch_size=batch_size) for t in tasks})
        res["tasks"] = {k: v.metrics for k, v in scored_tasks.items()}
        res["calibration"]["multiple_choice"] = {
            k: cal.from_probs(v.probs(), v.golds) for k, v in scored_tasks.items()}
        res["robustness"] = stages.run("robustness", lambda: _robustness(
            model, enc, tasks, scored_tasks, sz, seed, batch_size))
        res["attack"] = stages.run("attack", lambda: _attack(model, enc, tasks, sz, seed))
        res["ood"], routing_ood = stages.run("ood", lambda: _ood(
            model, corpus, val, train, ood_in, sz, seed, batch_size, window))
        res["membership"] = stages.run("membership", lambda: mia.membership_metrics(
            mia.document_scores(train, [corpus.text(d) for d in corpus.train]),
            mia.document_scores(val, val_texts)))
        id_routing = summarize_routing(rc_id)
        res["moe"] = {"id": id_routing, "ood": routing_ood,
                      "id_vs_ood": {k: compare_routing(id_routing, v)
                                    for k, v in routing_ood.items()}}
        res["model"] = {"dir": str(model_dir), "weights_sha256": sha256_file(
            model_dir / "model.safetensors") if (model_dir / "model.safetensors").exists()
            else None, "config": model.config.to_dict(),
            "parameters": model.config.num_parameters()}
        manifest = data_dir / "manifest.json"
        res["data"] = {"dir": str(data_dir), "manifest_sha256": sha256_file(manifest)
                       if manifest.exists() else None, "val_documents": len(corpus.val),
                       "train_documents": len(corpus.train)}
        res["settings"] = {"quick": quick, "seed": seed, "batch_size": batch_size,
                           "window": window, **sz.__dict__}
        from trustmoe.eval.report import write_report

        res = _json_safe(res)
        stages.run("report", lambda: _write(out_dir, res, other, stages.timing, write_report))
        stages.run("profile", lambda: write_eval_profile(  # the drift monitor's reference
            model, model_dir, data_dir, tok_path, out_dir, quick=quick, seed=seed, batch_size=batch_size))
    finally:
        stages.close()
    if store_temperature:  # only once everything else succeeded
        nt = res["calibration"]["next_token"]
        cal.store_temperature(model_dir, nt["temperature"], {
            "method": "temperature scaling (min NLL on held-out tokens)",
            "fit_tokens": nt["fit_tokens"], "test_tokens": nt["test_before"]["n"],
            "ece_before": nt["test_before"]["ece_15_equal_width"],
            "ece_after": nt["test_after"]["ece_15_equal_width"], "eval_dir": str(out_dir),
        })
    return summary(res, out_dir)


def _check_out_dir(out_dir: Path, *inputs: Path) -> None:
    """The eval dir is replaced whole, so it must not be (or hold) an input or a foreign dir."""
    out = out_dir.resolve()
    for p in inputs:
        q = p.resolve()
        if out == q or out in q.parents:
            raise TrustmoeError(f"--out {out_dir} would replace the input directory {p}")
    if out.is_file():
        raise TrustmoeError(f"--out {out_dir} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "eval.json").exists():
        raise TrustmoeError(f"--out {out_dir} is a non-empty directory that is not an eval "
                            "dir; refusing to replace it")


def _write(out_dir: Path, res: dict[str, Any], other: dict[str, Any] | None,
           timing: dict[str, float], write_report: Any) -> None:
    from trustmoe.io import atomic_write_json

    res["timing_s"] = dict(timing)
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "eval.json", res)
        write_report(tmp, res, other)


def summary(res: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The short printable summary `trustmoe eval` and `trustmoe demo` show."""
    ppl = res["perplexity"]
    nt = res["calibration"]["next_token"]
    oods = {k: v["scores"][v["best"]]["auroc"] for k, v in res["ood"].items()}
    return {
        "perplexity": round(ppl["perplexity"], 3), "bits_per_byte": round(ppl["bits_per_byte"], 4),
        "tasks": {k: round(v["acc"], 4) for k, v in res["tasks"].items()},
        "ece_before": round(nt["test_before"]["ece_15_equal_width"], 4),
        "ece_after": round(nt["test_after"]["ece_15_equal_width"], 4),
        "temperature": round(nt["temperature"], 4),
        "ood_best_auroc": {k: round(v, 4) for k, v in oods.items()},
        "attack_success_rate": res["attack"].get("attack_success_rate"),
        "membership_max_auroc": round(res["membership"]["max_auroc"], 4),
        "report": str(out_dir / "report.html"),
        "eval_json": str(out_dir / "eval.json"),
    }


def _calibration(model: Any, corpus: Corpus, val: list[Scored], sz: Sizes, bs: int
                 ) -> dict[str, Any]:
    """All-token calibration from the stats; temperature fitted on half the docs, tested on the rest."""
    conf = np.concatenate([s.max_prob for s in val])
    correct = np.concatenate([s.greedy for s in val]).astype(np.float64)
    p_true = np.exp(np.concatenate([s.logprobs for s in val]))
    sum_p2 = np.concatenate([s.sum_p2 for s in val])
    all_tokens = cal.summary(conf, correct, p_true, sum_p2)
    fit_docs = [d[: sz.calib_tokens] for d in corpus.val[0::2][: sz.n_calib_docs]]
    test_docs = [d[: sz.calib_tokens] for d in corpus.val[1::2][: sz.n_calib_docs]]
    fit = loglik(model, fit_docs, batch_size=bs, return_logits=True)
    test = loglik(model, test_docs, batch_size=bs, return_logits=True)

    def cat(ss: list[Scored]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([s.logits for s in ss if s.logits is not None]),
                torch.from_numpy(np.concatenate([s.targets for s in ss])))

    fz, fy = cat(fit)
    tz, ty = cat(test)
    t = cal.fit_temperature(fz, fy)
    before, after = cal.from_logits(tz, ty, 1.0), cal.from_logits(tz, ty, t)
    return {"next_token": {"all_tokens": all_tokens, "temperature": t,
                           "fit_tokens": int(fy.numel()), "test_before": before,
                           "test_after": after}}


def _robustness(model: Any, enc: Any, tasks: list[Task], scored: dict[str, Any], sz: Sizes,
                seed: int, bs: int) -> dict[str, Any]:
    from trustmoe.eval.robustness import robustness

    out = {}
    for t in tasks:
        sub = Task(t.name, t.instances[: sz.n_robust])
        base = scored[t.name].correct()[: sz.n_robust]
        out[t.name] = robustness(model, enc, sub, seed=seed, batch_size=bs, base_correct=base)
    return out


def _attack(model: Any, enc: Any, tasks: list[Task], sz: Sizes, seed: int) -> dict[str, Any]:
    from trustmoe.eval.attack import run_attack

    task = next((t for t in tasks if t.name == "next-words"), tasks[0])
    return run_attack(model, enc, task, n=sz.n_attack, max_subs=sz.attack_subs,
                      n_candidates=sz.attack_candidates, seed=seed)


def _ood(model: Any, corpus: Corpus, val: list[Scored], train: list[Scored],
         extra: dict[str, list[str]], sz: Sizes, seed: int, bs: int, window: int
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    feats = np.stack([s.hidden for s in train if s.hidden is not None])
    fm = ood.FeatureModel.fit(feats)
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
        rc = RoutingCollector(model)
        with rc:
            scored = _scores(model, docs, bs, window, rc)
        scores[name] = ood.sequence_scores(scored, fm)
        routing[name] = summarize_routing(rc)
    result = ood.evaluate_sets(id_scores, scores)
    for name, s in scores.items():  # keep the raw scores of the best detector for histograms
        best = result[name]["best"]
        result[name]["hist"] = {"score": best, "id": id_scores[best].round(5).tolist(),
                                "ood": s[best].round(5).tolist()}
    return result, routing
