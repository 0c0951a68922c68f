"""`trustmoe data build` and `trustmoe data verify`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

data_app = typer.Typer(
    help="Build an audited, documented dataset from raw sources, and verify it later.",
    no_args_is_help=True,
)


def _split_csv(values: list[str]) -> tuple[str, ...]:
    return tuple(v.strip() for item in values for v in item.split(",") if v.strip())


@data_app.command("build")
def build(
    sources: list[str] = typer.Argument(
        None, help="Folders, text/JSONL/Parquet files, or `stdlib` (the default: this "
        "interpreter's standard-library .py source, licence PSF-2.0)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory to write."),
    license: str = typer.Option(None, "--license", help="Declared SPDX licence of the sources "
                                "(files with an SPDX header keep their own)."),
    allow_license: list[str] = typer.Option([], "--allow-license", help="SPDX ids that may "
                                            "enter (comma-separated or repeated); default: all."),
    eval_set: list[Path] = typer.Option([], "--eval-set", help="Eval set to check for "
                                        "contamination: JSONL with a text field, or one item "
                                        "per line. Repeatable."),
    decontaminate: bool = typer.Option(False, "--decontaminate",
                                       help="Drop documents that contain eval-set n-grams."),
    pii: str = typer.Option("redact", "--pii", help="PII/secrets: redact (typed placeholders "
                            "like <EMAIL>), drop the document, or keep."),
    dedup: str = typer.Option("near", "--dedup", help="exact (normalised hash), near "
                              "(+ MinHash LSH), or off."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="BPE vocabulary size."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/validation split."),
    val_fraction: float = typer.Option(0.05, "--val-fraction",
                                       help="Share of documents held out for validation "
                                       "(0: none)."),
    min_val_docs: int = typer.Option(8, "--min-val-docs", min=0, help="Hold out at least this "
                                     "many documents (at most a quarter of the corpus), so a "
                                     "small corpus can still be evaluated."),
    include: list[str] = typer.Option([], "--include", help="Glob of files to take from "
                                      "folders (repeatable; default all)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Glob of files/folders to skip."),
    include_tests: bool = typer.Option(False, "--include-tests", help="stdlib: also take the "
                                       "test suites (test/, tests/, idle_test/)."),
    text_field: str = typer.Option("text", "--text-field",
                                   help="Field holding the text in JSONL/Parquet sources."),
    tokenizer: Path = typer.Option(None, "--tokenizer",
                                   help="Use this tokenizer.json instead of training one."),
    shingle: int = typer.Option(5, "--shingle", help="Near dedup: words per shingle (shorter "
                                "finds more, but unrelated code starts to look alike)."),
    num_perm: int = typer.Option(128, "--num-perm", help="Near dedup: MinHash permutations "
                                 "(more: tighter Jaccard estimate, linear cost)."),
    near_threshold: float = typer.Option(0.8, "--near-threshold", help="Near dedup: Jaccard "
                                         "above which documents are duplicates."),
    ngram: int = typer.Option(13, "--ngram", help="Contamination: words per n-gram."),
    min_chars: int = typer.Option(16, "--min-chars", help="Quality: shortest document kept."),
    max_chars: int = typer.Option(4_000_000, "--max-chars",
                                  help="Quality: longest document kept."),
    max_repetition: float = typer.Option(0.6, "--max-repetition", help="Quality: highest "
                                         "share of non-blank lines repeating an earlier one."),
    n_canaries: int = typer.Option(0, "--canaries", help="Privacy audit: plant N random-secret "
                                   "canaries per repeat count in the training split "
                                   "(canaries.json; see `trustmoe security scan`)."),
    canary_repeats: str = typer.Option("1,10,100", "--canary-repeats",
                                       help="Comma-separated times each canary is inserted."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Build DATA_DIR: manifest, audit, datasheet, tokenizer and train/val token shards.

    Every input file is hashed and given a fate; rules drop or change documents
    (quality, licence, exact/near dedup, PII, contamination) and a poisoning screen reports
    suspicious patterns. The same sources and options give byte-identical outputs, and an
    interrupted build resumes from its finished stages.
    """
    from trustmoe.data.build import BuildOptions, build_dataset
    from trustmoe.data.canaries import CanaryOptions, parse_repeats
    from trustmoe.data.dedup import NearDupOptions
    from trustmoe.data.quality import QualityOptions

    opts = BuildOptions(
        license=license, allow_licenses=_split_csv(allow_license),
        eval_sets=tuple(str(p) for p in eval_set), decontaminate=decontaminate, pii=pii,
        dedup=dedup, vocab_size=vocab_size, seed=seed, val_fraction=val_fraction,
        min_val_docs=min_val_docs,
        include_tests=include_tests, include=tuple(include), exclude=tuple(exclude),
        text_field=text_field, tokenizer=str(tokenizer) if tokenizer else None,
        near=NearDupOptions(shingle=shingle, num_perm=num_perm, threshold=near_threshold),
        ngram=ngram, quality=QualityOptions(min_chars=min_chars, max_chars=max_chars,
                                            max_repetition=max_repetition),
        canaries=CanaryOptions(count=n_canaries, repeats=parse_repeats(canary_repeats), seed=seed),
    )
    result = build_dataset(sources or [], out, opts, progress=not (quiet or as_json))
    summary = result.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    print_summary(out, summary)


def print_summary(out: Path, s: dict[str, object]) -> None:
    """Print a `BuildResult.summary()` for people (also used by `trustmoe demo`): what was
    kept and dropped and why, the tokens, and each audit check with what the build did."""
    from typing import Any

    from rich.console import Console
    from rich.table import Table

    from trustmoe.data.explain import glance
    from trustmoe.io import read_json

    con = Console()
    rules: dict[str, int] = dict(s.get("dropped_by_rule") or {})  # type: ignore[call-overload]
    tokens: dict[str, int] = dict(s.get("tokens") or {})  # type: ignore[call-overload]
    why = ", ".join(f"{n} {r}" for r, n in sorted(rules.items(), key=lambda kv: -kv[1]))
    sha = str(s.get("manifest_sha256", ""))
    t = Table(title=f"dataset {out}", show_header=False, title_justify="left")
    t.add_row("documents", f"{s.get('documents')} examined: {s.get('kept')} kept, "
              f"{s.get('dropped')} dropped" + (f" ({why})" if why else ""))
    t.add_row("tokens", f"train {tokens.get('train', 0):,}, validation {tokens.get('val', 0):,} "
              f"(vocabulary {s.get('vocab_size')})")
    t.add_row("manifest", f"sha256 {sha[:16]}… (names this dataset)")
    con.print(t)
    audit_path = out / "audit.json"
    if not audit_path.exists():
        return
    audit: dict[str, Any] = read_json(audit_path, "audit")
    a = Table(title="audit", title_justify="left")
    for col in ("check", "found", "what the build did"):
        a.add_column(col, overflow="fold")
    rows = glance(audit)
    for r in rows:
        a.add_row(("[yellow]! [/]" if r.review else "") + r.check, r.found, r.done)
    con.print(a)
    for r in rows:
        if r.review:
            con.print(f"[yellow]to do[/] ({r.check}): {r.todo}", highlight=False)
    con.print(f"what each finding means: {out / 'audit.html'}; datasheet: "
              f"{out / 'DATASHEET.md'}", highlight=False)


@data_app.command("verify")
def verify(
    data_dir: Path = typer.Argument(..., help="Dataset directory written by `data build`."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Re-hash the sources and outputs of DATA_DIR; list every file that changed, appeared or
    vanished since the build (exit 1 on any mismatch)."""
    from trustmoe.data.manifest import verify as run_verify

    report = run_verify(data_dir)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        for kind in ("changed", "appeared", "vanished"):
            for name in report[kind]:
                typer.echo(f"{kind:9} {name}")
        status = "OK" if report["ok"] else "MISMATCH"
        typer.echo(f"{status}: {report['files_checked']} source files checked, "
                   f"manifest {report['manifest_sha256']}")
    if not report["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.add_typer(data_app, name="data")
