"""`trustmoe eval MODEL_DIR --data DATA_DIR --out EVAL_DIR`: evaluation beyond accuracy, of the
engine that serves (default), the torch model, or any OpenAI-compatible server."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.command("eval", help=EVAL_HELP, no_args_is_help=True)(eval_command)


EVAL_HELP = (
    "Evaluate a model on a dataset directory, through the backend that answers users.\n\n"
    "--backend engine (the default) measures what `trustmoe serve` runs: the engine's forward "
    "pass, fp32 or --quantize int8/int4 (with the perplexity change against fp32); "
    "--backend model measures the torch training module (adds hidden-state OOD scores, MoE "
    "routing diagnostics and the gradient-guided attack); --model-url http://host/v1 "
    "--tokenizer DIR measures any OpenAI-compatible server (ours, vLLM) through completions "
    "with echo and top-k logprobs (distribution summaries are then estimates, labelled so). "
    "Small held-out splits are reported with bootstrap 95% intervals.\n\n"
    "Writes EVAL_DIR/eval.json (every number, machine-readable) and EVAL_DIR/report.html "
    "(one page, plots inline): perplexity and bits per byte; multiple-choice accuracy "
    "(lm-eval's acc and acc_norm) on built-in tasks made from held-out documents plus any "
    "--tasks files; calibration (ECE, MCE, Brier, NLL, reliability diagrams; the fitted "
    "temperature is stored in the model dir's trustmoe.json); OOD detection against built-in "
    "shifts plus --ood sets; robustness to perturbations and a token-substitution attack; "
    "membership-inference signals and verbatim extraction; contamination of the evaluated "
    "items in the training split; MoE routing diagnostics. eval.json's flat `summary` block "
    "holds the numbers promotion gates read."
)


def eval_command(
    model_dir: Path | None = typer.Argument(None, help="Model directory (Hugging Face layout, "
                                            "or a quantized artifact); omit with --model-url."),
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
    device: str | None = typer.Option(None, "--device", help="torch device (default: cuda "
                                      "when present, else cpu)."),
    backend: str = typer.Option("engine", "--backend", help="engine (what `trustmoe serve` "
                                "runs) or model (the torch module)."),
    quantize: str | None = typer.Option(None, "--quantize", help="Engine weights: int8 or int4 "
                                        "(as `trustmoe serve --quantize`)."),
    model_url: str | None = typer.Option(None, "--model-url", help="An OpenAI-compatible "
                                         "server's base URL, e.g. http://127.0.0.1:8000/v1."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="With --model-url: the "
                                          "served model's dir (tokenizer.json, config.json)."),
    served_model: str | None = typer.Option(None, "--served-model", help="With --model-url: "
                                            "the model name (default: the server's first)."),
    top_logprobs: int = typer.Option(20, "--top-logprobs", min=1, max=100, help="With "
                                     "--model-url: alternatives per position to ask for."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="With --model-url: "
                                    "environment variable holding the API key, if any."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    import os

    from rich.console import Console

    from trustmoe.eval.runner import run_eval
    from trustmoe.io import TrustmoeError

    if model_dir is None and model_url is None:
        raise TrustmoeError("give a MODEL_DIR, or --model-url with --tokenizer")
    if model_url is not None and backend == "model":
        raise TrustmoeError("--model-url evaluates a server; it cannot be --backend model")
    summary = run_eval(
        model_dir, data, out, backend=backend, quantize=quantize, model_url=model_url,
        tokenizer=tokenizer, served_model=served_model, api_key=os.environ.get(api_key_env),
        top_logprobs=top_logprobs, quick=quick, progress=not as_json, task_files=tasks,
        ood_sets=ood, compare=compare, seed=seed, batch_size=batch_size,
        store_temperature=store_temperature, device=device,
    )
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    con = Console()
    lo, hi = summary["perplexity_ci95"]
    q = f" {summary['quantize']}" if summary["quantize"] else ""
    con.print(f"backend {summary['backend']}{q}: perplexity [bold]{summary['perplexity']}[/] "
              f"(95% CI {lo}-{hi})  bits/byte {summary['bits_per_byte']}")
    if summary["quantized_perplexity_delta"] is not None:
        con.print(f"perplexity change vs fp32: {100 * summary['quantized_perplexity_delta']:+.3f}%")
    for name, acc in summary["tasks"].items():
        con.print(f"task {name}: acc {acc}")
    con.print(f"next-token ECE {summary['ece_before']} -> {summary['ece_after']} "
              f"(T = {summary['temperature']})")
    for name, auroc in summary["ood_best_auroc"].items():
        con.print(f"OOD {name}: best AUROC {auroc}")
    con.print(f"attack success rate {summary['attack_success_rate']}, "
              f"membership max AUROC {summary['membership_max_auroc']}, "
              f"contamination hits {summary['contamination_hits']}")
    con.print(f"report: {summary['report']}")
