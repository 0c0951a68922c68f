"""`trustmoe demo`: the main job, end to end on the built-in corpus, within a time budget.

    stdlib source -> data build (audit) -> train `small` -> validate + sample -> eval report
    [-> serve with --serve]

`--minutes` bounds the whole demo's wall clock, not only training: the data build is timed,
and training gets what is left after keeping back time for what follows it (the last
validation and checkpoint, the sample and the evaluation). That reserve is counted in
training steps (`TAIL_STEPS`) at the pace the machine shows while it trains, so on a busy
machine the demo trains fewer steps rather than running over. The summary prints the time of
each stage against the budget, and `OUT/summary.json` keeps it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()

# What follows training (last validation + checkpoint, load + sample, `eval --quick` with its
# report) took 9-40 steps' time of the `small` preset on a shared 2-core machine (the more
# contended the cores, the slower a training step is next to eval's forward passes).
TAIL_STEPS = 50
QUIET_TOKENS_PER_S = 2000  # the `small` preset on a quiet 2-core machine
MIN_TRAIN_S = 20.0  # train at least this long, even when the budget is already spent


def demo_cmd(
    minutes: Annotated[float, typer.Option(
        help="Wall-clock budget for the whole demo (data build, training, sample and "
        "evaluation), in minutes; training gets what the other stages leave.")] = 5.0,
    out: Annotated[Path, typer.Option(help="Where the demo writes its artifacts.")] = Path("runs/demo"),
    preset: Annotated[str, typer.Option(help="Model preset to train.")] = "small",
    source: Annotated[list[str], typer.Option(
        "--source", help="Data source (folder or file; repeatable). Default: this "
        "interpreter's standard-library source.")] = ["stdlib"],  # noqa: B006
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    skip_eval: Annotated[bool, typer.Option("--skip-eval", help="Skip the evaluation stage.")] = False,
    serve: Annotated[bool, typer.Option("--serve", help="Serve the model at the end (OpenAI API).")] = False,
    port: Annotated[int, typer.Option(help="Port for --serve.")] = 8000,
) -> None:
    """Build a dataset from the Python standard library, train a small MoE on it, evaluate it,
    and print a sample — all artifacts under --out, each naming its inputs by SHA-256."""
    from trustmoe.io import TrustmoeError, atomic_write_json

    if minutes <= 0.5:
        raise TrustmoeError(f"--minutes must be more than 0.5, got {minutes}")
    budget = minutes * 60
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir, model_dir, eval_dir = out / "data", out / "model", out / "eval"
    seconds: dict[str, float] = {}

    def lap(stage: str, start: float) -> None:
        seconds[stage] = round(time.perf_counter() - start, 1)

    console.rule("[bold]1. data: build the dataset" + (" from the Python standard library"
                                                        if source == ["stdlib"] else ""))
    ts = time.perf_counter()
    _build_data(source, data_dir)
    lap("data build", ts)

    console.rule(f"[bold]2. train: the {preset} preset")
    left = budget - (time.perf_counter() - t0)
    tail = 3 if skip_eval else TAIL_STEPS
    train_s = max(MIN_TRAIN_S, left)
    console.print(f"{left:.0f}s of the {budget:.0f}s budget left; training stops in time to "
                  f"leave room for the sample and evaluation (about {tail} training steps' "
                  "worth, at the pace it measures)", highlight=False)
    if left < MIN_TRAIN_S * 3:
        console.print(f"[yellow]the budget is nearly spent: training gets at most "
                      f"{train_s:.0f}s, and the demo may run over --minutes {minutes:g}[/]")
    if model_dir.exists():
        shutil.rmtree(model_dir)  # the demo always trains afresh
    from trustmoe.train import train

    ts = time.perf_counter()
    res = train(data_dir, model_dir, preset, max_minutes=train_s / 60, device=device,
                reserve_steps=tail)
    lap("train", ts)
    console.print(f"trained {res.steps} steps ({res.tokens:,} tokens, "
                  f"{res.tokens_per_second:,.0f} tok/s) in {res.seconds:.0f}s")
    note = _starved_note(res, preset, minutes)
    if note:
        console.print(f"[yellow]{note}[/]", highlight=False)

    console.rule("[bold]3. sample (temperature 0.8, top-p 0.95, seed 0)")
    ts = time.perf_counter()
    from trustmoe.generation import generate_text

    # no trailing newline: BPE merges "\n" with the indentation that follows it
    prompt = "def fibonacci(n):"
    sample = generate_text(model_dir, prompt, max_tokens=64, temperature=0.8, top_p=0.95,
                           seed=0, device=device)
    console.print(prompt + sample["text"], markup=False, highlight=False)
    lap("sample", ts)

    ev: dict[str, Any] | None = None
    if not skip_eval:
        console.rule("[bold]4. eval: quality, calibration, OOD, robustness, memorisation")
        ts = time.perf_counter()
        ev = _evaluate(model_dir, data_dir, eval_dir)
        lap("eval", ts)

    from trustmoe.cli.registry import register_demo  # registry: version, gates, production

    ts = time.perf_counter()
    registered = register_demo(out, model_dir, None if skip_eval else eval_dir, data_dir, console)
    lap("registry", ts)
    seconds["total"] = round(time.perf_counter() - t0, 1)
    summary = _summary(out, data_dir, model_dir, eval_dir, preset, res, ev, seconds, budget)
    summary["note"] = note
    summary["registry"] = registered
    atomic_write_json(out / "summary.json", summary)
    console.rule(f"[bold green]demo finished in {seconds['total']:.0f}s "
                 f"(budget {budget:.0f}s)")
    console.print(summary_table(summary))
    console.print(next_steps(summary, port))
    if serve:
        ref, db = demo_serve_ref(registered)
        console.rule(f"[bold]5. serve {ref} on http://127.0.0.1:{port}/v1 (Ctrl-C to stop)")
        from trustmoe.serve.app import serve as serve_model
        from trustmoe.serve.fleet import ServeConfig

        serve_model(ref, host="127.0.0.1", port=port,
                    serve_config=ServeConfig(registry_url=db, follow=True))


def demo_serve_ref(registered: dict[str, Any]) -> tuple[str, str]:
    """What `demo --serve` serves: registry:demo@production from the demo's registry, or the
    version just registered when the gates kept it out of production."""
    target = registered["alias"] or registered["version"]
    return f"registry:{registered['name']}@{target}", registered["db"]


def _starved_note(res: Any, preset: str, minutes: float) -> str | None:
    """A plain word when the budget bought too little training to judge the model by (the
    schedule was fitted to the time left, or cut by it)."""
    from trustmoe.config import get_preset

    if res.steps >= min(100, get_preset(preset).train.max_steps):
        return None
    quiet = (f"; a quiet 2-core machine does about {QUIET_TOKENS_PER_S:,} for `small`"
             if preset == "small" else "")
    return (f"only {res.steps} training steps fit in the budget on this machine now "
            f"({res.tokens_per_second:,.0f} tok/s{quiet}), so the sample and the eval show a "
            f"barely trained model; `trustmoe demo --minutes {max(10, 2 * minutes):g}` "
            "trains longer")


def _build_data(sources: list[str], data_dir: Path) -> None:
    from trustmoe.cli.data import print_summary
    from trustmoe.data.build import build_dataset

    result = build_dataset(list(sources), data_dir)
    print_summary(data_dir, result.summary())  # kept/dropped by rule, tokens, audit findings


def _evaluate(model_dir: Path, data_dir: Path, eval_dir: Path) -> dict[str, Any]:
    from trustmoe.eval.runner import run_eval

    return run_eval(model_dir, data_dir, eval_dir, quick=True)


def _summary(out: Path, data_dir: Path, model_dir: Path, eval_dir: Path, preset: str, res: Any,
             ev: dict[str, Any] | None, seconds: dict[str, float], budget: float
             ) -> dict[str, Any]:
    """Everything the closing table shows, as JSON (written to OUT/summary.json)."""
    from trustmoe.config import get_preset
    from trustmoe.io import read_json

    data = read_json(data_dir / "manifest.json", "dataset manifest")
    cfg = get_preset(preset).model
    s: dict[str, Any] = {
        "out": str(out), "budget_s": budget, "seconds": seconds,
        "data": {"dir": str(data_dir), "documents": data["counts"]["documents"],
                 "kept": data["counts"]["kept"], "tokens": {k: data["tokens"][k]
                                                            for k in ("train", "val")},
                 "audit_html": str(data_dir / "audit.html")},
        "model": {"dir": str(model_dir), "preset": preset, "experts": cfg.num_local_experts,
                  "top_k": cfg.num_experts_per_tok, "steps": res.steps, "tokens": res.tokens,
                  "tokens_per_s": round(res.tokens_per_second, 1), "stopped": res.stopped},
        "validation": {"loss": res.val_loss, "perplexity": res.val_perplexity,
                       "tokens": res.val_tokens, "measured_on": res.val_measured_on()},
        "eval": None,
    }
    if ev is not None:
        s["eval"] = dict(ev, measured_on=_eval_measured_on(eval_dir))
    return s


def _eval_measured_on(eval_dir: Path) -> str:
    """What eval's perplexity is measured on, from eval.json (its own record of the sample)."""
    from trustmoe.io import read_json

    try:
        res = read_json(eval_dir / "eval.json", "eval.json")
        ppl, st = res["perplexity"], res.get("settings", {})
        return (f"{ppl['tokens']:,} tokens: the first {st.get('max_tokens', '?')} tokens or "
                f"fewer of {ppl['documents']} held-out documents, each scored from its start, "
                "so with less context than training's windows (usually a higher perplexity)")
    except (KeyError, TypeError, ValueError, OSError):
        return "held-out documents (see eval.json)"


def _fmt(x: Any, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}" if isinstance(x, float) else str(x)


def summary_table(s: dict[str, Any]) -> Table:
    """The closing summary as a two-column table: what was made, what was measured on what."""
    t = Table(title="demo summary", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    d, m, v = s["data"], s["model"], s["validation"]
    t.add_row("dataset", f"{d['dir']}: {d['kept']} of {d['documents']} documents kept; "
              f"{d['tokens']['train']:,} train / {d['tokens']['val']:,} validation tokens")
    t.add_row("model", f"{m['dir']}: preset {m['preset']} ({m['experts']} experts, top-{m['top_k']}),"
              f" {m['steps']} steps on {m['tokens']:,} tokens at {m['tokens_per_s']:,.0f} tok/s")
    t.add_row("validation (training)", f"loss {_fmt(v['loss'], 4)}, perplexity "
              f"{_fmt(v['perplexity'])} on {v['measured_on']}")
    e = s.get("eval")
    if e:
        t.add_row("eval perplexity", f"{_fmt(e.get('perplexity'))} (bits/byte "
                  f"{_fmt(e.get('bits_per_byte'), 3)}) on {e['measured_on']}")
        tasks = e.get("tasks") or {}
        if tasks:
            t.add_row("eval tasks", ", ".join(f"{k} accuracy {_fmt(a, 3)}"
                                              for k, a in tasks.items()))
        t.add_row("calibration", f"next-token ECE {_fmt(e.get('ece_before'), 3)} -> "
                  f"{_fmt(e.get('ece_after'), 3)} after temperature {_fmt(e.get('temperature'))}")
        ood = e.get("ood_best_auroc") or {}
        if ood:
            t.add_row("OOD detection", ", ".join(f"{k} AUROC {_fmt(a, 3)}" for k, a in ood.items()))
        t.add_row("robustness", f"attack success rate {_fmt(e.get('attack_success_rate'), 3)}; "
                  f"membership inference max AUROC {_fmt(e.get('membership_max_auroc'), 3)}")
    r = s.get("registry")
    if r:
        where = f"-> {r['alias']}" if r.get("alias") else f"not promoted: {r.get('refused', '?')}"
        t.add_row("registry", f"{r['name']} v{r['version']} sha256:{r['digest'][:16]}... {where} "
                  f"({r['db']})")
    secs = s["seconds"]
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in secs.items() if k != "total")
    over = secs["total"] - s["budget_s"]
    verdict = (f"within the {s['budget_s']:.0f}s budget" if over <= 0
               else f"[yellow]{over:.0f}s over the {s['budget_s']:.0f}s budget[/]")
    t.add_row("time", f"{parts}: {secs['total']:.0f}s in all, {verdict}")
    if s.get("note"):
        t.add_row("note", f"[yellow]{s['note']}[/]")
    return t


def next_steps(s: dict[str, Any], port: int = 8000) -> Table:
    """The commands to run next, each with what it gives."""
    model = s["model"]["dir"]
    t = Table.grid(padding=(0, 2))
    t.add_column(no_wrap=True)
    t.add_column(style="dim", overflow="fold")
    t.add_row("[bold]next:[/]", "")
    t.add_row(f"trustmoe serve {model}", f"OpenAI-compatible API on http://127.0.0.1:{port}/v1")
    r = s.get("registry")
    if r and r.get("alias"):
        t.add_row(f"trustmoe serve registry:{r['name']}@{r['alias']} --registry {r['db']} --follow",
                  "serve what the registry's alias names, hot-swapping when it moves")
    t.add_row(f'trustmoe generate {model} "def "', "sample from the model")
    if s.get("eval"):
        t.add_row(f"open {s['eval'].get('report', 'report.html')}", "the evaluation report")
    t.add_row(f"open {s['data']['audit_html']}", "what the data audit found, and what to do")
    t.add_row("trustmoe demo --minutes 10", "train longer for a better model")
    t.add_row(f"cat {Path(s['out']) / 'summary.json'}", "this summary as JSON")
    return t
