"""Privacy: canary exposure and membership inference for normal vs DP-SGD training at matched
steps, with the perplexity cost of DP.

A stdlib subset (`--include` packages) is built with `--canaries 3 --canary-repeats 1,10,100`
(20% held out); the tiny preset is trained `--steps` steps normally and with DP-SGD
(`--epsilon`, δ = `--delta`, C = `--max-grad-norm`, same batch size, sequence length and
steps); `trustmoe security scan` (exposure + membership, the same reference model for both,
trained once on half of the held-out chunks) audits each. Printed: exposure per repeat count,
the best attack's AUROC and TPR at 1% FPR, the reference attack's, and validation perplexity.

    python benchmarks/privacy.py                 # ~10 min on 2 cores
    python benchmarks/privacy.py --steps 150     # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

PACKAGES = ("email/*", "json/*", "http/*", "urllib/*", "logging/*", "concurrent/*")


def _scan(model: Path, data: Path, out: Path, ref_from: Path | None, chunks: int) -> dict[str, Any]:
    from trustmoe.security.scan import ScanOptions, run_scan

    if ref_from is not None:  # the same reference model (trained on held-out data only)
        shutil.copytree(ref_from / "reference", out / "reference")
        shutil.copyfile(ref_from / "reference.json", out / "reference.json")
    run_scan(model, data, out, ScanOptions(checks=("exposure", "membership"), n_chunks=chunks,
                                           n_candidates=1000), progress=False)
    res = json.loads((out / "security.json").read_text())
    mem = res["membership"]
    best = mem["best_attack"]
    return {
        "exposure": {k: v["exposure"] for k, v in res["exposure"]["by_repeats"].items()},
        "canaries_extracted": res["summary"]["canaries_extracted"],
        "mia_best_attack": best,
        "mia_best_auroc": mem["attacks"][best]["auroc"],
        "mia_best_tpr_at_1pct_fpr": mem["attacks"][best]["tpr_at_1pct_fpr"],
        "mia_reference_auroc": mem["attacks"].get("reference", {}).get("auroc"),
        "mia_reference_tpr_at_1pct_fpr": mem["attacks"].get("reference", {}).get("tpr_at_1pct_fpr"),
        "mia_loss_auroc": mem["attacks"]["loss"]["auroc"],
        "reference_reused": bool(mem["reference_model"].get("reused")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=150)
    ap.add_argument("--work", type=Path, default=None, help="keep artifacts here")
    a = ap.parse_args()
    from trustmoe.data.build import BuildOptions, build_dataset
    from trustmoe.data.canaries import CanaryOptions
    from trustmoe.security.dp import DPConfig
    from trustmoe.train import train

    work = a.work or Path(tempfile.mkdtemp(prefix="tm_privacy_"))
    try:
        t0 = time.perf_counter()
        build_dataset(["stdlib"], work / "data", BuildOptions(
            include=PACKAGES, vocab_size=1024, val_fraction=0.2,
            canaries=CanaryOptions(count=3, repeats=(1, 10, 100))), progress=False)
        over = {"batch_size": a.batch_size, "seq_len": 128, "eval_every": a.steps,
                "checkpoint_every": a.steps, "warmup_steps": 20, "eval_batches": 4}
        out: dict[str, Any] = {"benchmark": "privacy", "steps": a.steps, "batch_size": a.batch_size,
                               "seq_len": 128, "preset": "tiny", "packages": list(PACKAGES)}
        runs = {}
        for name, dp in (("normal", None), ("dp", DPConfig(a.epsilon, a.delta, a.max_grad_norm))):
            ts = time.perf_counter()
            res = train(work / "data", work / name, "tiny", max_steps=a.steps, overrides=over,
                        progress=False, dp=dp)
            runs[name] = {"val_perplexity": round(res.val_perplexity or float("nan"), 3),
                          "train_seconds": round(time.perf_counter() - ts, 1),
                          "dp": res.dp}
        for name in ("normal", "dp"):
            ref = None if name == "normal" else work / "sec_normal"
            runs[name] |= _scan(work / name, work / "data", work / f"sec_{name}", ref, a.chunks)
        out |= runs
        out["dp_perplexity_cost"] = round(runs["dp"]["val_perplexity"] / runs["normal"]["val_perplexity"], 3)
        out["exposure_falls_with_dp"] = all(
            (runs["dp"]["exposure"][k]["value"] or 0) < (runs["normal"]["exposure"][k]["value"] or 0)
            for k in ("10", "100"))
        out["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out, indent=2))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
