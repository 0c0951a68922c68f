"""`build_dataset`: sources → audited documents → tokenizer → token shards → dataset directory.

Stages run in a hidden staging directory beside the output (`.<name>.build/`); each stage
writes its results, then a `<stage>.done` file holding the hash of everything it depends on.
A rerun with the same sources and options skips every finished stage (an interrupted build
resumes); a change anywhere invalidates the stages after it. The dataset directory itself is
swapped in at the end in one rename, so a half-built dataset never looks complete. Nothing in
the outputs depends on time, so the same sources and options give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from trustmoe.data import canaries, licenses, rules, sources
from trustmoe.data.dedup import NearDupOptions
from trustmoe.data.poison import PoisonOptions
from trustmoe.data.quality import QualityOptions
from trustmoe.io import TrustmoeError, atomic_dir, atomic_write_json, read_json, sha256_file
from trustmoe.security.integrity import write_manifest

T = TypeVar("T")
FORMAT = "trustmoe-dataset/1"
PII_MODES = ("redact", "drop", "keep")
DEDUP_MODES = ("exact", "near", "off")


@dataclass(frozen=True)
class BuildOptions:
    license: str | None = None  # declared SPDX licence for every source without its own
    allow_licenses: tuple[str, ...] = ()  # empty: every licence may enter (undetermined flagged)
    eval_sets: tuple[str, ...] = ()
    decontaminate: bool = False
    pii: str = "redact"
    dedup: str = "near"
    vocab_size: int = 4096
    seed: int = 0
    val_fraction: float = 0.05  # share of documents held out for validation
    min_val_docs: int = 8  # ... but at least this many (at most a quarter of the corpus)
    include_tests: bool = False  # stdlib: also take test/, tests/, idle_test/
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    text_field: str = "text"
    tokenizer: str | None = None  # an existing tokenizer.json to use instead of training one
    tokenizer_train_bytes: int = 16_000_000  # train the tokenizer on at most this much text
    quality: QualityOptions = field(default_factory=QualityOptions)
    near: NearDupOptions = field(default_factory=NearDupOptions)
    ngram: int = 13  # contamination: word n-gram length
    ngram_min_words: int = 8  # eval items shorter than this are not indexed (too generic)
    poison: PoisonOptions = field(default_factory=PoisonOptions)
    canaries: canaries.CanaryOptions = field(default_factory=canaries.CanaryOptions)

    def validate(self) -> BuildOptions:
        if self.pii not in PII_MODES:
            raise TrustmoeError(f"--pii must be one of {', '.join(PII_MODES)}, not {self.pii!r}")
        if self.dedup not in DEDUP_MODES:
            raise TrustmoeError(f"--dedup must be one of {', '.join(DEDUP_MODES)}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise TrustmoeError(f"val fraction must be in [0, 0.5), not {self.val_fraction}")
        if not isinstance(self.min_val_docs, int) or self.min_val_docs < 0:
            raise TrustmoeError(f"--min-val-docs must be a non-negative integer, not "
                                f"{self.min_val_docs}")
        if not 259 <= self.vocab_size <= 1 << 20:
            raise TrustmoeError(f"--vocab-size must be in [259, {1 << 20}], not {self.vocab_size}")
        q = self.quality
        if q.min_chars < 0 or q.max_chars < q.min_chars or not 0 < q.max_repetition <= 1:
            raise TrustmoeError("quality bounds are inconsistent (min/max chars, repetition)")
        n = self.near
        if n.shingle < 1 or not 16 <= n.num_perm <= 1024 or not 0 < n.threshold <= 1:
            raise TrustmoeError("near-dup options: shingle >= 1, 16 <= perms <= 1024, "
                                "0 < threshold <= 1")
        if not 1 <= self.ngram <= 64 or self.ngram_min_words < 1:
            raise TrustmoeError(f"contamination n-gram must be in [1, 64], not {self.ngram}")
        self.canaries.validate()
        for p in self.eval_sets:
            if not Path(p).is_file():
                raise TrustmoeError(f"eval set not found: {p}")
        return self


@dataclass
class BuildResult:
    out_dir: Path
    manifest_sha256: str
    stats: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step (not in files)

    def summary(self) -> dict[str, Any]:
        """A short printable dict: documents kept/dropped, tokens per split, audit counts."""
        return dict(self.stats)


def build_dataset(
    sources_: list[str],
    out_dir: Path,
    options: BuildOptions | None = None,
    progress: bool = True,
) -> BuildResult:
    """Build a dataset directory from `sources_` (paths or `stdlib`; empty means `stdlib`)."""
    opts = (options or BuildOptions()).validate()
    out_dir = Path(out_dir)
    specs = sources.resolve_sources(
        list(sources_), opts.include_tests, opts.include, opts.exclude, opts.text_field
    )
    declared = licenses.canonical(opts.license) if opts.license else None
    allow = frozenset(licenses.canonical(a) for a in opts.allow_licenses)
    stage_dir = out_dir.parent / f".{out_dir.name}.build"
    stage_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = _build(specs, files_of=sources.list_files, out_dir=out_dir, stage_dir=stage_dir,
                        opts=opts, declared=declared, allow=allow, progress=progress)
    except BaseException:
        if not any(stage_dir.glob("*.done")):  # nothing worth resuming: leave no trace
            shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    shutil.rmtree(stage_dir, ignore_errors=True)
    return result


def _build(specs: list[sources.SourceSpec], files_of: Callable[[sources.SourceSpec],
           list[sources.InputFile]], out_dir: Path, stage_dir: Path, opts: BuildOptions,
           declared: str | None, allow: frozenset[str], progress: bool) -> BuildResult:
    timings: dict[str, float] = {}
    with _progress(progress, timings) as step:  # step(msg): one timed step (bar if enabled)
        step("listing and hashing sources")
        files = {s.name: files_of(s) for s in specs}
        if not any(files.values()):
            raise TrustmoeError(f"no input files in {', '.join(str(s.root) for s in specs)}")
        key = _key({"format": FORMAT, "options": _opts_key(opts), "sources": [
            [asdict(f) | {"abspath": None} for f in files[s.name]] for s in specs]})
        audit = _stage(stage_dir, "rules", key, lambda d: _rules_stage(
            d, specs, files, declared, allow, opts, step))
        kept = [(doc, text) for doc, text in audit.pop("_kept")]
        if not kept:
            why = ", ".join(f"{r} {n}" for r, n in audit["counts"]["dropped_by_rule"].items())
            raise TrustmoeError(f"no documents left after the rules (dropped: {why})")
        tkey = _key([key, opts.vocab_size, opts.tokenizer and sha256_file(opts.tokenizer),
                     opts.tokenizer_train_bytes, opts.seed])
        step("training the tokenizer")
        _stage(stage_dir, "tokenizer", tkey, lambda d: _tokenizer_stage(d, kept, opts))
        skey = _key([tkey, opts.seed, opts.val_fraction, opts.min_val_docs, asdict(opts.canaries)])
        step("tokenizing and splitting")
        shard_info = _stage(stage_dir, "shards", skey, lambda d: _shard_stage(d, kept, opts, step))
        step("writing the dataset directory")
        result = _finalize(out_dir, stage_dir, specs, files, audit, shard_info, opts, declared)
    result.timings = timings
    return result


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _opts_key(opts: BuildOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["eval_sets"] = [[p, sha256_file(p) if Path(p).is_file() else None] for p in opts.eval_sets]
    return d


def _stage(stage_dir: Path, name: str, key: str, run: Callable[[Path], Any]) -> Any:
    """Run a stage unless its `.done` file records the same key; return its JSON result."""
    done = stage_dir / f"{name}.done"
    result = stage_dir / f"{name}.stage.json"
    if done.exists() and result.exists():
        try:
            if read_json(done, "stage marker").get("key") == key:
                return read_json(result, "stage result")
        except TrustmoeError:
            pass  # a damaged marker: redo the stage
    done.unlink(missing_ok=True)
    out = run(stage_dir)
    atomic_write_json(result, out)
    atomic_write_json(done, {"key": key})
    return out


def _rules_stage(stage_dir: Path, specs: list[sources.SourceSpec],
                 files: dict[str, list[sources.InputFile]], declared: str | None,
                 allow: frozenset[str], opts: BuildOptions, step: _Reporter
                 ) -> dict[str, Any]:
    step("reading documents")
    raws = []
    for spec in specs:
        lic_files = licenses.LicenseFiles(spec.root)
        src_decl = declared or (sources.STDLIB_LICENSE if spec.kind == "stdlib" else None)
        for f in step.track(files[spec.name], len(files[spec.name])):
            for raw in sources.read_documents(spec, f):
                data = raw.data if isinstance(raw.data, bytes) else b""
                raws.append((raw, *licenses.resolve(data, src_decl, lic_files, f.path)))
    step("licence and quality rules")
    docs, errors = rules.decode_docs(raws, opts.quality, allow)
    del raws
    audit: dict[str, Any] = {}
    steps = rules.pipeline(opts)
    rules.run_steps(docs, steps, audit, on_step=step)
    rules.summarize(docs, audit, errors)
    audit["_docs"] = [[d.id, d.license, d.fate, d.rule, d.changes, d.license_source]
                      for d in docs]
    audit["_kept"] = [[d.id, d.text] for d in docs if d.kept]
    return audit


def _tokenizer_stage(stage_dir: Path, kept: list[tuple[str, str]], opts: BuildOptions
                     ) -> dict[str, Any]:
    from trustmoe.data.tokenizer import load_tokenizer, train_tokenizer

    if opts.tokenizer:
        tok = load_tokenizer(opts.tokenizer)
        trained_on = 0
    else:
        sample = _tokenizer_sample([t for _, t in kept], opts.tokenizer_train_bytes, opts.seed)
        tok = train_tokenizer(sample, opts.vocab_size)
        trained_on = sum(len(t) for t in sample)
    (stage_dir / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    return {"vocab_size": tok.get_vocab_size(), "trained_on_chars": trained_on}


def _tokenizer_sample(texts: list[str], budget: int, seed: int) -> list[str]:
    """All texts if they fit the budget, else a seeded random subset that does."""
    if sum(len(t) for t in texts) <= budget:
        return texts
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        if total + len(texts[i]) > budget:
            continue
        out.append(i)
        total += len(texts[i])
    return [texts[i] for i in sorted(out)]


def val_count(n_docs: int, val_fraction: float, min_val_docs: int) -> int:
    """How many of n_docs documents to hold out: the fraction, but at least `min_val_docs`
    (capped at a quarter of the corpus, so training keeps most of a small one), at least one,
    and never every document. Raises when there are too few documents to hold any out."""
    if val_fraction <= 0:
        return 0
    if n_docs < 2:
        raise TrustmoeError(
            f"the corpus has {n_docs} document{'s' if n_docs != 1 else ''} after the rules: at "
            "least 2 are needed to hold one out for validation (add documents, or pass "
            "--val-fraction 0 to train on everything without a validation split)")
    n_val = max(1, math.ceil(val_fraction * n_docs), min(min_val_docs, n_docs // 4))
    return min(n_val, n_docs - 1)


def split_docs(ids: list[str], seed: int, val_fraction: float, min_val_docs: int = 0
               ) -> set[str]:
    """Ids of the validation documents: a seeded shuffle of the sorted ids, first `val_count`."""
    n_val = val_count(len(ids), val_fraction, min_val_docs)
    if n_val == 0:
        return set()
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return set(order[:n_val])


def _shard_stage(stage_dir: Path, kept: list[tuple[str, str]], opts: BuildOptions,
                 step: _Reporter | None = None) -> dict[str, Any]:
    from trustmoe.data.shards import write_shard
    from trustmoe.data.tokenizer import eos_id, load_tokenizer

    tok = load_tokenizer(stage_dir / "tokenizer.json")
    eos = eos_id(tok)
    val_ids = split_docs([i for i, _ in kept], opts.seed, opts.val_fraction, opts.min_val_docs)
    kept = canaries.insert(kept, opts.canaries)  # training split only, after the tokenizer
    chunks, start, size = [], 0, 0  # ~1 MB per batch: parallel inside, a bar between
    for i, (_, t) in enumerate(kept):
        size += len(t)
        if size >= 1_000_000 or i == len(kept) - 1:
            chunks.append((start, i + 1))
            start, size = i + 1, 0
    batches = step.track(chunks, len(chunks)) if step is not None else chunks
    encs = [e for a, b in batches for e in tok.encode_batch_fast([t for _, t in kept[a:b]])]
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    split_of: dict[str, str] = {}
    for (doc_id, _), enc in zip(kept, encs, strict=True):
        split = "val" if doc_id in val_ids else "train"
        split_of[doc_id] = split
        parts[split].append(np.asarray([*enc.ids, eos], dtype=np.int64))  # (n_i + 1,)
    info: dict[str, Any] = {"splits": split_of, "tokens": {}}
    vocab = tok.get_vocab_size()
    for split, arrs in parts.items():
        ids = np.concatenate(arrs) if arrs else np.empty(0, dtype=np.int64)
        meta = write_shard(stage_dir / f"{split}.bin", ids, vocab)
        info["tokens"][split] = meta["tokens"]
        info["tokens"]["dtype"] = meta["dtype"]
    info["tokens"]["vocab_size"] = vocab
    info["tokens"]["eos_id"] = eos
    info["tokens"]["documents"] = {s: len(a) for s, a in parts.items()}
    info["canaries"] = canaries.summary(opts.canaries)
    return info


def _finalize(out_dir: Path, stage_dir: Path, specs: list[sources.SourceSpec],
              files: dict[str, list[sources.InputFile]], audit: dict[str, Any],
              shard_info: dict[str, Any], opts: BuildOptions, declared: str | None
              ) -> BuildResult:
    from trustmoe.data import manifest as mf
    from trustmoe.data.tokenizer import load_tokenizer, save_tokenizer

    with atomic_dir(out_dir) as tmp:
        save_tokenizer(load_tokenizer(stage_dir / "tokenizer.json"), tmp)
        for split in ("train", "val"):
            shutil.copyfile(stage_dir / f"{split}.bin", tmp / f"{split}.bin")
        canaries.write(tmp, opts.canaries)
        _, stats = mf.write_outputs(tmp, specs, files, audit, shard_info, opts, declared)
        write_manifest(tmp)  # last: every file of the dataset dir, by SHA-256
        _normal_permissions(tmp)
    sha = sha256_file(out_dir / "manifest.json")
    stats["manifest_sha256"] = sha
    return BuildResult(out_dir=out_dir, manifest_sha256=sha, stats=stats)


def _normal_permissions(d: Path) -> None:
    """Temp files are created private (0600); a dataset is readable like any other output."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for p in d.iterdir():
        os.chmod(p, 0o666 & ~umask)


class _Reporter:
    """`step(description)` starts a timed step; `step.track(items, total)` shows a progress bar
    for the current step. Silent (timings only) when progress is off."""

    def __init__(self, timings: dict[str, float], progress: Any = None) -> None:
        import time

        self._clock = time.perf_counter
        self.timings, self.progress = timings, progress
        self._name, self._t = "", self._clock()
        self._task: Any = None

    def __call__(self, msg: str) -> None:
        now = self._clock()
        if self._name:
            self.timings[self._name] = round(now - self._t, 3)
            if self.progress is not None and self._task is not None:
                self.progress.update(self._task, completed=1, total=1)
        self._name, self._t = msg, now
        if self.progress is not None and msg:
            self._task = self.progress.add_task(msg, total=None)

    def track(self, items: Iterable[T], total: int) -> Iterator[T]:
        if self.progress is not None and self._task is not None:
            self.progress.update(self._task, total=total, completed=0)
        for item in items:
            yield item
            if self.progress is not None and self._task is not None:
                self.progress.advance(self._task)


@contextmanager
def _progress(enabled: bool, timings: dict[str, float]) -> Iterator[_Reporter]:
    """A `_Reporter` that draws rich progress bars on stderr when enabled."""
    if not enabled:
        rep = _Reporter(timings)
        yield rep
        rep("")
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("[bold]data build[/] {task.description}"),
               BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        rep = _Reporter(timings, bar)
        yield rep
        rep("")
