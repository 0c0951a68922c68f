"""Whole-corpus `data build` timing: the standard library, with and without its test suites.

Target: the whole standard library (tests included, ~31 MB of .py) builds in under 2 minutes
on 2 cores. The peer, measured in the same run, is the bare minimum any pipeline must do with
the same corpus: read the files, train the same BPE tokenizer on the same text budget and
encode everything with `tokenizers` (no hashing, rules, audit or datasheet). The ratio
`build / bare` is the cost of governance.

Wall seconds are what a user waits; CPU seconds (all threads of this process) stay meaningful
while other work shares the machine. Per-step wall timings come from the build itself.

    python benchmarks/data_build.py               # default corpus and the whole stdlib
    python benchmarks/data_build.py --only default
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from trustmoe.data.build import BuildOptions, build_dataset
from trustmoe.data.sources import list_files, resolve_sources
from trustmoe.data.tokenizer import train_tokenizer

TARGET_FULL_S = 120.0


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_build(include_tests: bool, work: Path) -> dict[str, object]:
    out = work / ("full" if include_tests else "default")
    t, c = time.perf_counter(), _cpu()
    res = build_dataset(["stdlib"], out, BuildOptions(include_tests=include_tests),
                        progress=False)
    wall, cpu = time.perf_counter() - t, _cpu() - c
    s = res.summary()
    mb = sum(e["bytes"] for e in json.loads((out / "manifest.json").read_text())["files"]) / 1e6
    shutil.rmtree(out)
    return {"corpus_mb": round(mb, 2), "documents": s["documents"], "kept": s["kept"],
            "tokens": s["tokens"], "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "steps_wall_s": res.timings}


def run_bare(include_tests: bool) -> dict[str, object]:
    t, c = time.perf_counter(), _cpu()
    opts = BuildOptions(include_tests=include_tests)
    [spec] = resolve_sources(["stdlib"], include_tests=include_tests)
    texts = []
    for f in list_files(spec):
        try:
            texts.append(f.abspath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    sample, total = [], 0
    for tx in texts:  # same character budget as the build's tokenizer sample
        if total + len(tx) <= opts.tokenizer_train_bytes:
            sample.append(tx)
            total += len(tx)
    tok = train_tokenizer(sample, opts.vocab_size)
    n = sum(len(e.ids) for e in tok.encode_batch_fast(texts))
    return {"tokens": n, "wall_s": round(time.perf_counter() - t, 2),
            "cpu_s": round(_cpu() - c, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("default", "full"), default=None)
    args = ap.parse_args()
    cases = [("default", False), ("full", True)]
    if args.only:
        cases = [c for c in cases if c[0] == args.only]
    report: dict[str, object] = {"benchmark": "data build of the Python standard library"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tests in cases:
            build = run_build(tests, Path(tmp))
            bare = run_bare(tests)
            report[name] = {
                "include_tests": tests, "build": build, "bare_tokenize_peer": bare,
                "wall_ratio_build_vs_bare": round(float(build["wall_s"]) / bare["wall_s"], 2),  # type: ignore[arg-type]
            }
            if tests:
                report[name]["target_wall_s"] = TARGET_FULL_S  # type: ignore[index]
                report[name]["within_target"] = float(build["wall_s"]) < TARGET_FULL_S  # type: ignore[index, arg-type]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
