"""`trustmoe demo`: the main job, end to end on the built-in corpus, within a time budget.

    stdlib source -> data build (audit) -> train `small` -> validate + sample -> eval report
    [-> serve with --serve]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel

console = Console()

EVAL_RESERVE_MIN = 1.0  # minutes kept back from training for evaluation and the sample


def demo_cmd(
    minutes: Annotated[float, typer.Option(help="Time budget for the whole demo, in minutes.")] = 5.0,
    out: Annotated[Path, typer.Option(help="Where the demo writes its artifacts.")] = Path("runs/demo"),
    preset: Annotated[str, typer.Option(help="Model preset to train.")] = "small",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    skip_eval: Annotated[bool, typer.Option("--skip-eval", help="Skip the evaluation stage.")] = False,
    serve: Annotated[bool, typer.Option("--serve", help="Serve the model at the end (OpenAI API).")] = False,
    port: Annotated[int, typer.Option(help="Port for --serve.")] = 8000,
) -> None:
    """Build a dataset from the Python standard library, train a small MoE on it, evaluate it,
    and print a sample — all artifacts under --out, each naming its inputs by SHA-256."""
    from trustmoe.io import TrustmoeError

    if minutes <= 0.5:
        raise TrustmoeError(f"--minutes must be more than 0.5, got {minutes}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir, model_dir, eval_dir = out / "data", out / "model", out / "eval"

    console.rule("[bold]1. data: build the dataset from the Python standard library")
    _build_data(data_dir)

    console.rule("[bold]2. train: the small MoE preset")
    elapsed = (time.perf_counter() - t0) / 60
    reserve = 0.3 if skip_eval else EVAL_RESERVE_MIN
    train_minutes = max(0.5, minutes - elapsed - reserve)
    if model_dir.exists():
        shutil.rmtree(model_dir)  # the demo always trains afresh
    from trustmoe.train import train

    res = train(data_dir, model_dir, preset, max_minutes=train_minutes, device=device)
    console.print(f"trained {res.steps} steps ({res.tokens:,} tokens, "
                  f"{res.tokens_per_second:,.0f} tok/s) in {res.seconds:.0f}s")
    console.print(Panel(f"validation loss [bold]{res.val_loss:.4f}[/], perplexity "
                        f"[bold]{res.val_perplexity:.2f}[/]", title="model " + str(model_dir)))

    console.rule("[bold]3. sample (temperature 0.8, top-p 0.95, seed 0)")
    from trustmoe.generation import generate_text

    # no trailing newline: BPE merges "\n" with the indentation that follows it
    prompt = "def fibonacci(n):"
    sample = generate_text(model_dir, prompt, max_tokens=64, temperature=0.8, top_p=0.95,
                           seed=0, device=device)
    console.print(prompt + sample["text"], markup=False, highlight=False)

    if not skip_eval:
        console.rule("[bold]4. eval: quality, calibration, OOD, robustness, memorisation")
        console.print(_evaluate(model_dir, data_dir, eval_dir))

    from trustmoe.cli.registry import register_demo  # registry: version, gates, production

    register_demo(out, model_dir, None if skip_eval else eval_dir, data_dir, console)

    console.rule(f"[bold green]demo finished in {time.perf_counter() - t0:.0f}s")
    if serve:
        console.rule(f"[bold]5. serve on http://127.0.0.1:{port}/v1 (Ctrl-C to stop)")
        from trustmoe.serve.app import serve as serve_model

        serve_model(model_dir, host="127.0.0.1", port=port)


def _build_data(data_dir: Path) -> None:
    from trustmoe.cli.data import print_summary
    from trustmoe.data.build import build_dataset

    result = build_dataset(["stdlib"], data_dir)
    print_summary(data_dir, result.summary())  # kept/dropped by rule, tokens, audit findings


def _evaluate(model_dir: Path, data_dir: Path, eval_dir: Path) -> dict[str, Any]:
    from trustmoe.eval.runner import run_eval

    return run_eval(model_dir, data_dir, eval_dir, quick=True)
