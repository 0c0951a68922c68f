"""Drift detection on generated request streams: detection delay and false alarms, per detector.

A tiny MoE model is trained for a few hundred steps on part of Python's standard library.
Prompts are random spans of held-out stdlib files (code) or paragraphs of the stdlib's own
docstrings (English prose). Two thirds of the held-out files are the "population": the
reference profile (built by the same function `trustmoe eval` uses) and the no-drift stream
draw independent spans from them; the last third is only used by the `new_files` stream:

    none         code only (false alarms: mean requests between alarms vs the configured ERT)
    new_files    code, then code from files the reference never saw (a subtle shift: each
                 file has its own identifiers; shows how much the population matters)
    abrupt       code, then prose from request t0 on
    gradual      the share of prose rises linearly from 0 to 1 over 2,000 requests after t0
    length       code, then much shorter code prompts (8-48 tokens instead of 32-256)
    model_swap   the same code traffic, served from t0 on by a model whose router weights were
                 perturbed (routing shifts; a "worse v2")

Features of every prompt are computed once (`features_from_model`); streams re-sample them.
Per detector: median detection delay in requests after t0 (over --runs streams) and the share
of runs detected within --horizon requests; on `none`, false alarms per 10,000 requests and the
observed mean run length / configured ERT (target >= 0.9). alibi-detect's `MMDDriftOnline` runs
on the same hidden states where it is installed (it needs numpy < 2: use a separate venv, e.g.
`python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 'alibi-detect[torch]'
&& .venv-bench/bin/pip install -e '.[eval,deploy]'`).

    python benchmarks/drift.py --out drift.json         # ~10 minutes on 2 cores (alibi: +4)
    python benchmarks/drift.py --quick                  # fewer runs, shorter streams
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmoe.deploy.drift import DETECTORS, DetectorSpec, DriftSuite
from trustmoe.engine.features import RequestFeatures, features_from_model
from trustmoe.eval.profile import profile_from_prompts

STDLIB_PARTS = ("email/*.py", "json/*.py", "http/*.py", "asyncio/*.py", "urllib/*.py", "logging/*.py",
                "concurrent/*.py", "importlib/*.py", "unittest/*.py", "xml/*.py", "multiprocessing/*.py",
                "collections/*.py", "encodings/*.py", "sqlite3/*.py", "wsgiref/*.py", "html/*.py")
PROSE_MODULES = ("argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "enum",
                 "fractions", "functools", "heapq", "inspect", "itertools", "os", "pathlib", "pickle",
                 "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
                 "tempfile", "textwrap", "threading", "typing", "zipfile", "bisect", "copy", "difflib",
                 "gettext", "locale", "optparse", "pprint", "queue", "sched", "selectors", "signal")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_model(work: Path, steps: int) -> tuple[Path, Path]:
    from trustmoe.data.build import BuildOptions, build_dataset
    from trustmoe.train import train

    data = work / "data"
    build_dataset(["stdlib"], data, BuildOptions(include=STDLIB_PARTS, vocab_size=2048, val_fraction=0.3,
                                                 dedup="exact"), progress=False)
    model = work / "model"
    train(data, model, "tiny", max_steps=steps, progress=False,
          overrides={"seq_len": 128, "batch_size": 8, "eval_every": 10**6, "checkpoint_every": 10**6})
    return data, model


def held_out_files(data: Path) -> list[list[int]]:
    from trustmoe.data.shards import open_tokens
    from trustmoe.data.tokenizer import eos_id, load_tokenizer
    from trustmoe.eval.corpus import split_documents

    eos = eos_id(load_tokenizer(data))
    return [d.astype(np.int64).tolist() for d in split_documents(open_tokens(data, "val"), eos)
            if len(d) >= 64]


def code_prompts(files: list[list[int]], n: int, lo: int, hi: int, rng: random.Random) -> list[list[int]]:
    out = []
    while len(out) < n:
        f = rng.choice(files)
        L = min(rng.randint(lo, hi), len(f))
        s = rng.randint(0, len(f) - L)
        out.append(f[s:s + L])
    return out


def prose_paragraphs() -> list[str]:
    import importlib

    paras: list[str] = []
    for name in PROSE_MODULES:
        mod = importlib.import_module(name)
        objs = [mod, *[v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isfunction(v)]]
        for o in objs:
            doc = inspect.getdoc(o) or ""
            for p in doc.split("\n\n"):
                lines = p.splitlines()
                if not lines or any(ln.startswith((" ", ">>>", "..")) for ln in lines):
                    continue
                text = " ".join(ln.strip() for ln in lines)
                letters = sum(c.isalpha() or c == " " for c in text)
                if len(text) >= 60 and letters / len(text) > 0.9 and text.count("(") < 2:
                    paras.append(text)
    return sorted(set(paras))


def prose_prompts(paras: list[str], tok: Any, n: int, lo: int, hi: int, rng: random.Random) -> list[list[int]]:
    enc = [tok.encode(p, add_special_tokens=False).ids for p in paras]
    out = []
    while len(out) < n:
        L = rng.randint(lo, hi)
        ids: list[int] = []
        while len(ids) < L:
            ids += rng.choice(enc) + tok.encode(" ", add_special_tokens=False).ids
        out.append(ids[:L])
    return out


def perturbed_router(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    import copy

    from trustmoe.model.moe import MoE

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in m.layers:  # type: ignore[union-attr]
            if isinstance(block.mlp, MoE):
                w = block.mlp.gate.weight
                w.add_(torch.randn(w.shape, generator=g) * w.std() * scale)
    return m


Stream = Callable[[int, np.random.Generator], list[RequestFeatures]]


def make_stream(before: list[RequestFeatures], after: list[RequestFeatures], t0: int, ramp: int = 0) -> Stream:
    """Requests 0..n-1: from `before` until t0, then `after` (mixed in linearly over `ramp`)."""
    def draw(n: int, rng: np.random.Generator) -> list[RequestFeatures]:
        out = []
        for t in range(n):
            share = 0.0 if t < t0 else 1.0 if ramp == 0 else min(1.0, (t - t0 + 1) / ramp)
            pool = after if rng.random() < share else before
            out.append(pool[int(rng.integers(len(pool)))])
        return out
    return draw


def run_detectors(suite: DriftSuite, feats: list[RequestFeatures], stop_after: int | None = None
                  ) -> dict[str, list[int]]:
    """Alarm request numbers per detector (k windows in a row, counter reset after each alarm)."""
    W = suite.window
    streak = dict.fromkeys(suite.detectors, 0)
    alarms: dict[str, list[int]] = {k: [] for k in suite.detectors}
    for w0 in range(0, len(feats) - W + 1, W):
        for r in suite.evaluate(feats[w0:w0 + W]):
            streak[r.detector] = streak[r.detector] + 1 if r.crossed else 0
            if streak[r.detector] >= suite.consecutive[r.detector]:
                alarms[r.detector].append(w0 + W)
                streak[r.detector] = 0
        if stop_after is not None and all(any(a > stop_after for a in v) for v in alarms.values()):
            break
    return alarms


def false_alarms(suite: DriftSuite, stream: Stream, runs: int, length: int, seed: int) -> dict[str, Any]:
    counts = dict.fromkeys(suite.detectors, 0)
    for r in range(runs):
        feats = stream(length, np.random.default_rng(seed + r))
        for k, v in run_detectors(suite, feats).items():
            counts[k] += len(v)
    total = runs * length
    out = {}
    for k, c in counts.items():
        mrl = total / c if c else None
        out[k] = {"requests": total, "false_alarms": c, "per_10k_requests": round(1e4 * c / total, 3),
                  "mean_run_length": round(mrl, 1) if mrl else f"> {total}",
                  "ratio_to_ert": round(mrl / suite.ert_requests, 3) if mrl else None}
    return out


def delays(suite: DriftSuite, stream: Stream, runs: int, t0: int, horizon: int, seed: int) -> dict[str, Any]:
    got: dict[str, list[float]] = {k: [] for k in suite.detectors}
    for r in range(runs):
        feats = stream(t0 + horizon, np.random.default_rng(seed + r))
        for k, v in run_detectors(suite, feats, stop_after=t0).items():
            after = [a - t0 for a in v if a > t0]
            got[k].append(after[0] if after else float("inf"))
    return {k: {"median_delay": _median(v), "detected_share": round(float(np.mean(np.isfinite(v))), 3)}
            for k, v in got.items()}


def _median(v: list[float]) -> float | None:
    m = float(np.median(v))
    return m if np.isfinite(m) else None


def alibi_side(ref_hidden: np.ndarray, streams: dict[str, Stream], window: int, ert: int, runs: int,
               t0: int, horizon: int, none_len: int, seed: int, n_boot: int) -> dict[str, Any]:
    try:
        from alibi_detect.cd import MMDDriftOnline
    except ImportError as e:
        return {"skipped": f"alibi-detect is not importable here ({e}); see the docstring for its venv"}
    t = time.perf_counter()
    cd = MMDDriftOnline(ref_hidden.astype(np.float32), ert=ert, window_size=window, backend="pytorch",
                        n_bootstraps=n_boot, verbose=False)
    setup_s = time.perf_counter() - t

    def first_alarms(feats: list[RequestFeatures], stop: int | None) -> list[int]:
        cd.reset_state()
        out = []
        for i, f in enumerate(feats):
            if cd.predict(f.hidden.astype(np.float32))["data"]["is_drift"]:
                out.append(i + 1)
                cd.reset_state()
                if stop is not None and i + 1 > stop:
                    break
        return out

    res: dict[str, Any] = {"detector": "alibi_detect.cd.MMDDriftOnline (pytorch)", "window_size": window,
                           "ert": ert, "n_bootstraps": n_boot, "setup_s": round(setup_s, 1)}
    c = 0
    for r in range(max(1, runs // 4)):
        c += len(first_alarms(streams["none"](none_len, np.random.default_rng(seed + r)), None))
    total = max(1, runs // 4) * none_len
    res["none"] = {"requests": total, "false_alarms": c, "per_10k_requests": round(1e4 * c / total, 3),
                   "ratio_to_ert": round(total / c / ert, 3) if c else None}
    for name, s in streams.items():
        if name == "none":
            continue
        d = []
        for r in range(runs):
            after = [a - t0 for a in first_alarms(s(t0 + horizon, np.random.default_rng(seed + r)), t0) if a > t0]
            d.append(after[0] if after else float("inf"))
        res[name] = {"median_delay": _median(d), "detected_share": round(float(np.mean(np.isfinite(d))), 3)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="training steps of the tiny model")
    ap.add_argument("--runs", type=int, default=20, help="streams per drift scenario")
    ap.add_argument("--t0", type=int, default=1000, help="request at which drift starts")
    ap.add_argument("--horizon", type=int, default=3000, help="requests watched after t0")
    ap.add_argument("--quick", action="store_true", help="fewer runs and shorter no-drift streams")
    ap.add_argument("--no-alibi", action="store_true", help="skip alibi-detect even where installed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    runs = 6 if args.quick else args.runs
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        log("building a stdlib dataset and training the tiny model ...")
        data, mdir = build_model(Path(tmp), args.steps)
        from trustmoe.data.tokenizer import load_tokenizer
        from trustmoe.model.hf import load

        model, tok = load(mdir), load_tokenizer(mdir)
        files = held_out_files(data)
        rng.shuffle(files)
        pop_files, new_files = files[: 2 * len(files) // 3], files[2 * len(files) // 3:]
        paras = prose_paragraphs()
        log(f"{len(files)} held-out files, {len(paras)} prose paragraphs; computing features ...")
        prof = profile_from_prompts(model, code_prompts(pop_files, 600, 32, 256, rng), {"kind": "benchmark"})
        code = features_from_model(model, code_prompts(pop_files, 1500, 32, 256, rng))
        unseen = features_from_model(model, code_prompts(new_files, 1000, 32, 256, rng))
        prose = features_from_model(model, prose_prompts(paras, tok, 1000, 32, 256, rng))
        short = features_from_model(model, code_prompts(pop_files, 1000, 8, 48, rng))
        swapped_model = perturbed_router(model, 0.5, args.seed)
        swapped = features_from_model(swapped_model, code_prompts(pop_files, 1000, 32, 256, rng))  # type: ignore[arg-type]
    t0, hz = args.t0, args.horizon
    streams: dict[str, Stream] = {
        "none": make_stream(code, code, 10**12), "abrupt": make_stream(code, prose, t0),
        "gradual": make_stream(code, prose, t0, ramp=2000), "length": make_stream(code, short, t0),
        "model_swap": make_stream(code, swapped, t0), "new_files": make_stream(code, unseen, t0),
    }
    configs = {"window50_k1_ert2000": (50, 1, 2000, 40_000 if args.quick else 100_000, 4 if args.quick else 10),
               "window100_k2_ert10000": (100, 2, 10_000, 100_000 if args.quick else 200_000,
                                         3 if args.quick else 10)}
    out: dict[str, Any] = {"model": "tiny preset", "steps": args.steps, "profile_requests": prof.n_requests,
                           "stream_pools": {"code": len(code), "prose": len(prose), "short_code": len(short),
                                            "swapped_model": len(swapped), "unseen_files": len(unseen)},
                           "held_out_files": {"population": len(pop_files), "unseen": len(new_files)},
                           "t0": t0, "horizon": hz, "runs": runs, "ours": {}}
    for name, (W, k, ert, none_len, none_runs) in configs.items():
        log(f"{name}: calibrating and running ...")
        t = time.perf_counter()
        suite = DriftSuite(prof, window=W, ert_requests=ert, seed=args.seed,
                           specs={d: DetectorSpec(consecutive=k) for d in DETECTORS})
        cfg: dict[str, Any] = {"window": W, "consecutive": k, "ert_requests": ert,
                               "calibration_s": round(time.perf_counter() - t, 1),
                               "thresholds": {d: det.calibration.threshold for d, det in suite.detectors.items()
                                              if det.calibration},
                               "floors": {d: det.floor for d, det in suite.detectors.items()},
                               "none": false_alarms(suite, streams["none"], none_runs, none_len, args.seed + 100)}
        for s in ("abrupt", "gradual", "length", "model_swap", "new_files"):
            cfg[s] = delays(suite, streams[s], runs, t0, hz, args.seed + 200)
        out["ours"][name] = cfg
        log(json.dumps(cfg))
    if not args.no_alibi:
        log("alibi-detect MMDDriftOnline (window 50, ERT 2000) ...")
        boot = 5000 if args.quick else 20000
        out["alibi_detect"] = alibi_side(prof.hidden, streams, 50, 2000, runs, t0, hz, 40_000, args.seed + 300, boot)
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
