"""`trustmoe eval MODEL_DIR --data DATA_DIR --out EVAL_DIR`: evaluation beyond accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.command("eval", help=EVAL_HELP, no_args_is_help=True)(eval_command)


EVAL_HELP = (
    "Evaluate a model directory on a dataset directory.\n\n"
    "Writes EVAL_DIR/eval.json (every number, machine-readable) and EVAL_DIR/report.html "
    "(one page, plots inline): perplexity and bits per byte; multiple-choice accuracy "
    "(lm-eval's acc and acc_norm) on built-in tasks made from held-out documents plus any "
    "--tasks files; calibration (ECE, MCE, Brier, NLL, reliability diagrams; the fitted "
    "temperature is stored in the model dir's trustmoe.json); OOD detection against built-in "
    "shifts plus --ood sets; robustness to perturbations and a gradient-guided "
    "token-substitution attack; membership-inference signals; MoE routing diagnostics."
)


def eval_command(
    model_dir: Path = typer.Argument(..., help="Model directory (Hugging Face layout)."),
    data: Path = typer.Option(..., "--data", help="Dataset directory (train.bin, val.bin, "
                              "tokenizer.json) from `trustmoe data build`."),
    out: Path = typer.Option(..., "--out", help="Eval directory to write (replaced whole)."),
    tasks: list[Path] = typer.Option([], "--tasks", help="JSONL multiple-choice task file with "
                                     "context, choices, gold per line (repeatable)."),
    ood: list[Path] = typer.Option([], "--ood", help="OOD text set: a .txt file (documents "
                                   "separated by blank lines), a .jsonl file with a text "
                                   "field, a folder of those, or a dataset dir (repeatable)."),
    compare: Path | None = typer.Option(None, "--compare", help="Another eval dir to show "
                                        "side by side with deltas in report.html."),
    quick: bool = typer.Option(False, "--quick", help="Small samples (well under a minute for "
                               "the small preset on 2 cores)."),
    seed: int = typer.Option(0, "--seed", help="Seed for every sample and perturbation."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Sequences per forward "
                                   "pass (changes nothing beyond float noise)."),
    store_temperature: bool = typer.Option(True, "--store-temperature/--no-store-temperature",
                                           help="Write the fitted temperature into the model "
                                           "dir's trustmoe.json."),
    device: str | None = typer.Option(None, "--device", help="torch device (default cpu)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    from rich.console import Console

    from trustmoe.eval.runner import run_eval

    summary = run_eval(
        model_dir, data, out, quick=quick, progress=not as_json, task_files=tasks,
        ood_sets=ood, compare=compare, seed=seed, batch_size=batch_size,
        store_temperature=store_temperature, device=device,
    )
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    con = Console()
    con.print(f"perplexity [bold]{summary['perplexity']}[/]  "
              f"bits/byte {summary['bits_per_byte']}")
    for name, acc in summary["tasks"].items():
        con.print(f"task {name}: acc {acc}")
    con.print(f"next-token ECE {summary['ece_before']} -> {summary['ece_after']} "
              f"(T = {summary['temperature']})")
    for name, auroc in summary["ood_best_auroc"].items():
        con.print(f"OOD {name}: best AUROC {auroc}")
    con.print(f"attack success rate {summary['attack_success_rate']}, "
              f"membership max AUROC {summary['membership_max_auroc']}")
    con.print(f"report: {summary['report']}")
