"""`run_eval`: one LM backend + one dataset dir -> `eval.json`, `report.html`, plots.

Every number comes through the `LM` interface (`trustmoe.eval.lm`), so the same run measures
the torch model (`backend="model"`), the engine that `trustmoe serve` runs, fp32 or quantized
(`backend="engine"`, the default: evaluate what is served), or any OpenAI-compatible server
(`model_url=`). One pass over held-out documents feeds perplexity, next-token calibration, the
OOD in-distribution side, membership non-members and ID routing; one pass over training
documents feeds the OOD feature model and membership members. Sample sizes are fixed by
`quick` and the seed, so two runs give the same numbers; batch size changes nothing beyond
float noise. Small held-out splits are evaluated with bootstrap 95% intervals.

eval.json's `summary` block is flat and stable (the registry's promotion gates read it):

- `backend`, `quantize`: what was measured; `estimated_distribution`: true when the
  distribution summaries are top-k estimates (OpenAI backend).
- `perplexity`, `perplexity_ci95_low/high`, `bits_per_byte`: held-out documents, whole.
- `ece`, `ece_ci95_low/high`: next-token ECE (15 equal-width bins, test half, T = 1);
  `ece_after_temperature`, `temperature`: after temperature scaling.
- `accuracy`, `accuracy_ci95_low/high`: multiple-choice acc over every task instance.
- `ood_auroc`, `ood_auroc_ci95_low/high`: the worst OOD set's best-score AUROC.
- `membership_auroc`: the strongest membership signal (training vs held-out documents).
- `attack_success_rate`: token-substitution attack (gradient or black-box).
- `contamination_hits`: evaluated task items found in the training split (13-grams; built-in
  items found there are dropped before scoring and counted in `contamination.builtin_items_dropped`);
  `dataset_contamination_hits`: eval-set items the dataset's own audit found.
- `extraction_exact_train`, `extraction_exact_heldout`: greedy verbatim extraction rates.
- `fp32_perplexity`, `quantized_perplexity_delta`: with int8/int4 weights, the float engine's
  perplexity on the same documents and q / fp32 - 1 (else null).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from trustmoe.eval import calibration as cal
from trustmoe.eval import membership as mia
from trustmoe.eval import stages as st
from trustmoe.eval.corpus import Corpus, load_corpus, read_texts
from trustmoe.eval.lm import LM, open_lm
from trustmoe.eval.moe_diag import compare_routing, summarize_routing
from trustmoe.eval.profile import write_eval_profile
from trustmoe.eval.stages import Sizes
from trustmoe.eval.tasks import Task, builtin_tasks, load_task_file, perplexity, score_task
from trustmoe.io import TrustmoeError, atomic_dir, json_safe, read_json, sha256_file
from trustmoe.security.integrity import write_manifest

__all__ = ["Sizes", "run_eval", "summary"]
MIN_DOCS = 2  # per split: calibration needs a fit and a test document, membership one each


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


STAGES = ["load data", "held-out pass", "training pass", "quantization", "calibration",
          "contamination", "tasks",
          "robustness", "attack", "ood", "membership", "report", "profile"]


def run_eval(
    model_dir: Path | None, data_dir: Path, out_dir: Path, *, backend: str = "engine",
    quantize: str | None = None, model_url: str | None = None, tokenizer: Path | None = None,
    served_model: str | None = None, api_key: str | None = None, top_logprobs: int = 20,
    quick: bool = False, progress: bool = True, task_files: Sequence[Path] = (),
    ood_sets: Sequence[Path] = (), compare: Path | None = None, seed: int = 0,
    batch_size: int = 16, store_temperature: bool = True, device: str | None = None,
    sizes: Sizes | None = None,
) -> dict[str, Any]:
    """Evaluate a backend; write `out_dir/eval.json` + `report.html`; return a short summary.

    `model_url` selects the OpenAI backend (then `tokenizer` or `model_dir` names the served
    model's tokenizer dir). The fitted temperature is stored in `model_dir/trustmoe.json` only
    when the float weights themselves were evaluated (model, or engine without quantization).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    model_dir = Path(model_dir) if model_dir is not None else None
    if model_url is not None:
        backend = "openai"
    if batch_size < 1:
        raise TrustmoeError(f"batch size must be >= 1, got {batch_size}")
    _check_out_dir(out_dir, *[p for p in (model_dir, data_dir, tokenizer) if p is not None])
    tasks_in = [load_task_file(Path(p)) for p in task_files]  # fail fast on bad input
    ood_in = {Path(p).stem or str(p): read_texts(Path(p)) for p in ood_sets}
    other = read_json(Path(compare) / "eval.json", "comparison eval.json") if compare else None
    lm = open_lm(backend, model_dir=model_dir, quantize=quantize, model_url=model_url,
                 tokenizer=tokenizer, device=device, batch_size=batch_size,
                 top_logprobs=top_logprobs, api_key=api_key, served_model=served_model)
    try:
        res = _evaluate(lm, model_dir, data_dir, out_dir, tasks_in, ood_in, other,
                        quick=quick, progress=progress, seed=seed, batch_size=batch_size,
                        sizes=sizes or Sizes.for_mode(quick), device=device)
    finally:
        lm.close()
    floats = lm.kind in ("model", "engine") and res["summary"]["quantize"] is None
    if store_temperature and model_dir is not None and floats:  # once all else succeeded
        nt = res["calibration"]["next_token"]
        cal.store_temperature(model_dir, nt["temperature"], {
            "method": "temperature scaling (min NLL on held-out tokens)",
            "backend": lm.kind, "fit_tokens": nt["fit_tokens"],
            "test_tokens": nt["test_before"]["n"],
            "ece_before": nt["test_before"]["ece_15_equal_width"],
            "ece_after": nt["test_after"]["ece_15_equal_width"], "eval_dir": str(out_dir),
        })
    return summary(res, out_dir)


def _evaluate(lm: LM, model_dir: Path | None, data_dir: Path, out_dir: Path, tasks_in: list[Any],
              ood_in: dict[str, list[str]], other: dict[str, Any] | None, *, quick: bool,
              progress: bool, seed: int, batch_size: int, sizes: Sizes, device: str | None
              ) -> dict[str, Any]:
    if lm.codec is None:
        raise TrustmoeError("the model has no tokenizer.json: evaluation needs text")
    torch.manual_seed(seed)
    sz = sizes
    stages = _Stages(STAGES, progress)
    res: dict[str, Any] = {"schema": 2, "backend": lm.describe()}
    try:
        corpus: Corpus = stages.run("load data", lambda: load_corpus(
            data_dir, lm.codec, n_train=sz.n_train, n_val=sz.n_val, seed=seed,  # type: ignore[arg-type]
            max_tokens=sz.max_tokens))
        if len(corpus.val) < MIN_DOCS or len(corpus.train) < MIN_DOCS:
            raise TrustmoeError(
                f"{data_dir} has too few documents to evaluate ({len(corpus.val)} held-out, "
                f"{len(corpus.train)} training; at least {MIN_DOCS} of each): rebuild it with "
                "more held out (`trustmoe data build --min-val-docs N`)")
        val_texts = [corpus.text(d) for d in corpus.val]
        rc_id = lm.routing_collector()
        if rc_id is not None:
            with rc_id:
                val = stages.run("held-out pass", lambda: st.doc_scores(lm, corpus.val, rc_id))
        else:
            val = stages.run("held-out pass", lambda: st.doc_scores(lm, corpus.val))
        train = stages.run("training pass", lambda: st.doc_scores(lm, corpus.train))
        res["perplexity"] = perplexity(val, val_texts, seed)
        res["quantization"] = stages.run("quantization", lambda: _quantization(
            lm, model_dir, corpus, res["perplexity"], batch_size, device))
        res["calibration"] = stages.run("calibration", lambda: st.calibration(
            lm, corpus, val, sz, seed))
        builtin = builtin_tasks(corpus, sz.n_task, seed)
        res["contamination"] = stages.run("contamination", lambda: _contamination(
            builtin + tasks_in, data_dir))
        builtin = _drop_contaminated(builtin, res["contamination"])
        tasks = builtin + tasks_in
        if not tasks:
            raise TrustmoeError("no multiple-choice tasks: held-out documents are too short (or "
                                "every built-in item also occurs in the training split)")
        scored_tasks = stages.run("tasks", lambda: {t.name: score_task(lm, t, seed=seed)
                                                    for t in tasks})
        res["tasks"] = {k: v.metrics for k, v in scored_tasks.items()}
        res["calibration"]["multiple_choice"] = {
            k: cal.from_probs(v.probs(), v.golds) for k, v in scored_tasks.items()}
        res["robustness"] = stages.run("robustness", lambda: st.robustness(
            lm, tasks, scored_tasks, sz, seed))
        res["attack"] = stages.run("attack", lambda: st.attack(lm, tasks, sz, seed))
        res["ood"], routing_ood = stages.run("ood", lambda: st.ood_family(
            lm, corpus, val, train, ood_in, sz, seed))
        res["membership"] = stages.run("membership", lambda: _membership(
            lm, corpus, val, train, sz, seed))
        res["moe"] = _moe(lm, rc_id, routing_ood)
        res["model"] = _model_info(lm, model_dir)
        manifest = data_dir / "manifest.json"
        res["data"] = {"dir": str(data_dir), "manifest_sha256": sha256_file(manifest)
                       if manifest.exists() else None, "val_documents": len(corpus.val),
                       "train_documents": len(corpus.train)}
        res["settings"] = {"quick": quick, "seed": seed, "batch_size": batch_size,
                           "window": lm.max_length, "backend": lm.kind, **sz.__dict__}
        res["summary"] = _summary_block(res, scored_tasks, seed)
        from trustmoe.eval.report import write_report

        res = json_safe(res)
        stages.run("report", lambda: _write(out_dir, res, other, stages.timing, write_report,
                                            lambda tmp: stages.run("profile", lambda: _profile(
                                                lm, model_dir, data_dir, tmp, out_dir, quick,
                                                seed, batch_size, device))))
    finally:
        stages.close()
    return res


def _membership(lm: LM, corpus: Corpus, val: list[Any], train: list[Any], sz: Sizes,
                seed: int) -> dict[str, Any]:
    from trustmoe.eval.extraction import extraction

    out = mia.membership_metrics(
        mia.document_scores(train, [corpus.text(d) for d in corpus.train]),
        mia.document_scores(val, [corpus.text(d) for d in corpus.val]), seed)
    out["extraction"] = extraction(lm, corpus.train, corpus.val, n=sz.n_extract)
    return out


def _contamination(tasks: list[Any], data_dir: Path) -> dict[str, Any]:
    from trustmoe.eval.contamination import task_contamination

    return task_contamination(tasks, data_dir)


def _drop_contaminated(builtin: list[Task], report: dict[str, Any]) -> list[Task]:
    """Built-in items whose text also occurs in the training split (a held-out document that
    near-duplicates a training one: shared boilerplate, generated tables) are not evaluated:
    they would measure memory, not skill. They are counted in the report
    (`builtin_items_dropped`); hits in the user's own task files stay, as `hits`."""
    names = {t.name for t in builtin}
    hit = {(name, no) for name, no in report.get("hit_items", []) if name in names}
    out = []
    for t in builtin:
        keep = [inst for i, inst in enumerate(t.instances) if (t.name, i + 1) not in hit]
        if len(keep) >= 2:
            out.append(Task(t.name, keep))
    report["builtin_items_dropped"] = len(hit)
    report["hits"] -= len(hit)  # what remains evaluated
    report["hits_by_task"] = {k: (0 if k in names else v) for k, v in report["hits_by_task"].items()}
    return out


def _quantization(lm: LM, model_dir: Path | None, corpus: Corpus, ppl: dict[str, Any],
                  batch_size: int, device: str | None) -> dict[str, Any]:
    """With a quantized engine: the float engine's perplexity on the same documents."""
    from trustmoe.eval.backend_engine import EngineLM

    q = lm.quantize if isinstance(lm, EngineLM) else None
    out: dict[str, Any] = {"quantize": q, "fp32_perplexity": None, "perplexity_delta": None}
    if q is None:
        return out
    if model_dir is None or not (model_dir / "model.safetensors").exists():
        out["note"] = "no float weights beside the quantized artifact: delta not measured"
        return out
    with EngineLM.from_dir(model_dir, device=device, batch_size=batch_size) as ref:
        base = perplexity(st.doc_scores(ref, corpus.val, hidden=False),
                          [corpus.text(d) for d in corpus.val])
    out["fp32_perplexity"] = base["perplexity"]
    out["perplexity_delta"] = ppl["perplexity"] / base["perplexity"] - 1.0
    return out


def _moe(lm: LM, rc_id: Any, routing_ood: dict[str, Any]) -> dict[str, Any]:
    if rc_id is None:
        return {"id": {}, "ood": {}, "id_vs_ood": {},
                "unavailable": lm.caps.limits().get("routing", "")}
    id_routing = summarize_routing(rc_id)
    return {"id": id_routing, "ood": routing_ood,
            "id_vs_ood": {k: compare_routing(id_routing, v) for k, v in routing_ood.items()}}


def _model_info(lm: LM, model_dir: Path | None) -> dict[str, Any]:
    from trustmoe.model.hf import load_config

    weights = None
    if model_dir is not None:
        for name in ("model.safetensors", "model.quant.safetensors"):
            if (model_dir / name).exists():
                weights = sha256_file(model_dir / name)
        cfg = load_config(model_dir)
        return {"dir": str(model_dir), "weights_sha256": weights, "config": cfg.to_dict(),
                "parameters": cfg.num_parameters()}
    d = lm.describe()
    return {"dir": f"{d.get('url')} ({d.get('model')})", "weights_sha256": None, "config": {},
            "parameters": 0}


def _summary_block(res: dict[str, Any], scored_tasks: dict[str, Any], seed: int
                   ) -> dict[str, Any]:
    """The flat block gates read (documented in the module docstring)."""
    ppl, nt = res["perplexity"], res["calibration"]["next_token"]
    acc = st.pooled_accuracy(scored_tasks, seed)
    worst = min(res["ood"], key=lambda k: res["ood"][k]["scores"][res["ood"][k]["best"]]["auroc"])
    best = res["ood"][worst]["scores"][res["ood"][worst]["best"]]
    mem = res["membership"]
    ext = mem["extraction"]
    q = res["quantization"]
    return {
        "backend": res["backend"]["kind"], "quantize": q["quantize"],
        "estimated_distribution": not res["backend"]["exact_distribution"],
        "perplexity": ppl["perplexity"], "perplexity_ci95_low": ppl["perplexity_ci95_low"],
        "perplexity_ci95_high": ppl["perplexity_ci95_high"],
        "bits_per_byte": ppl["bits_per_byte"],
        "ece": nt["test_before"]["ece_15_equal_width"],
        "ece_ci95_low": nt["test_before"]["ece_ci95_low"],
        "ece_ci95_high": nt["test_before"]["ece_ci95_high"],
        "ece_after_temperature": nt["test_after"]["ece_15_equal_width"],
        "temperature": nt["temperature"],
        "accuracy": acc["accuracy"], "accuracy_ci95_low": acc["accuracy_ci95_low"],
        "accuracy_ci95_high": acc["accuracy_ci95_high"],
        "ood_auroc": best["auroc"], "ood_auroc_ci95_low": best.get("auroc_ci95_low"),
        "ood_auroc_ci95_high": best.get("auroc_ci95_high"),
        "membership_auroc": mem["max_auroc"],
        "attack_success_rate": res["attack"]["attack_success_rate"],
        "contamination_hits": res["contamination"]["hits"],
        "dataset_contamination_hits": res["contamination"]["dataset_audit_hits"],
        "extraction_exact_train": ext["members"]["exact_match_rate"],
        "extraction_exact_heldout": ext["nonmembers"]["exact_match_rate"],
        "fp32_perplexity": q["fp32_perplexity"],
        "quantized_perplexity_delta": q["perplexity_delta"],
    }


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
           timing: dict[str, float], write_report: Any,
           extra: Callable[[Path], object] | None = None) -> None:
    """eval.json, report.html and `extra(tmp)`'s files, one atomic dir with its manifest."""
    from trustmoe.io import atomic_write_json

    res["timing_s"] = dict(timing)
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "eval.json", res)
        write_report(tmp, res, other)
        if extra is not None:
            extra(tmp)
        write_manifest(tmp)  # last: every file of the eval dir, by SHA-256


def _profile(lm: LM, model_dir: Path | None, data_dir: Path, tmp: Path, out_dir: Path,
             quick: bool, seed: int, batch_size: int, device: str | None) -> Path | None:
    """The drift monitor's reference profile (profile.safetensors + profile.json), from the
    float model of `model_dir`: a URL backend has none (the monitor then needs
    `trustmoe monitor profile` from trusted traffic)."""
    if model_dir is None or not (model_dir / "model.safetensors").exists():
        return None
    from trustmoe.model.hf import load

    tok = model_dir / "tokenizer.json"
    tok = tok if tok.exists() else data_dir / "tokenizer.json"
    model = load(model_dir, device=device)
    return write_eval_profile(model, model_dir, data_dir, tok, tmp, quick=quick, seed=seed,
                              batch_size=batch_size, eval_dir=out_dir)


def summary(res: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The short printable summary `trustmoe eval` and `trustmoe demo` show."""
    ppl = res["perplexity"]
    nt = res["calibration"]["next_token"]
    oods = {k: v["scores"][v["best"]]["auroc"] for k, v in res["ood"].items()}
    s = res["summary"]
    return {
        "backend": s["backend"], "quantize": s["quantize"],
        "perplexity": round(ppl["perplexity"], 3),
        "perplexity_ci95": [_r(ppl.get("perplexity_ci95_low"), 3),
                            _r(ppl.get("perplexity_ci95_high"), 3)],
        "bits_per_byte": round(ppl["bits_per_byte"], 4),
        "tasks": {k: round(v["acc"], 4) for k, v in res["tasks"].items()},
        "ece_before": round(nt["test_before"]["ece_15_equal_width"], 4),
        "ece_after": round(nt["test_after"]["ece_15_equal_width"], 4),
        "temperature": round(nt["temperature"], 4),
        "ood_best_auroc": {k: round(v, 4) for k, v in oods.items()},
        "attack_success_rate": res["attack"].get("attack_success_rate"),
        "membership_max_auroc": round(res["membership"]["max_auroc"], 4),
        "contamination_hits": s["contamination_hits"],
        "quantized_perplexity_delta": _r(s["quantized_perplexity_delta"], 5),
        "report": str(out_dir / "report.html"),
        "eval_json": str(out_dir / "eval.json"),
    }


def _r(x: Any, nd: int) -> float | None:
    return None if x is None else round(float(x), nd)
