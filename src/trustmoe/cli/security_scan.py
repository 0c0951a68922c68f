"""`trustmoe security scan MODEL --data DATA --out SEC_DIR`: privacy and backdoor audits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def scan_cmd(
    model: Annotated[Path, typer.Argument(help="Model directory to audit.")],
    data: Annotated[Path, typer.Option("--data", help="The dataset dir the model was trained on.")],
    out: Annotated[Path, typer.Option("--out", help="Where security.json and security.html go.")],
    check: Annotated[list[str], typer.Option(
        "--check", help="exposure, extraction, membership, backdoor (repeatable or comma-"
        "separated; default: all that apply — exposure only when DATA has canaries).")] = [],  # noqa: B006
    chunks: Annotated[int, typer.Option("--chunks", help="Audit chunks drawn per split.")] = 200,
    backdoor_chunks: Annotated[int, typer.Option(
        "--backdoor-chunks", help="Chunks per split for the backdoor screen (all when fewer): "
        "a trigger planted in 1% of documents must recur in the sample.")] = 5000,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", help="Tokens per chunk.")] = 128,
    candidates: Annotated[int, typer.Option(
        "--candidates", help="Exposure: random secrets scored per canary when |R| is too "
        "large to enumerate (skew-normal extrapolation).")] = 1000,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="Reference model for the LiRA-style attack (trained on data "
        "disjoint from DATA's training split); default: the scan trains one on half of the "
        "held-out chunks.")] = None,
    reference_steps: Annotated[int | None, typer.Option(
        "--reference-steps", help="Steps for the scan-trained reference (default: the "
        "target's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampling and bootstrap seed.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward.")] = 16,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary block as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Audit MODEL for memorisation and backdoors against the dataset it was trained on.

    Canary exposure (Secret Sharer), extraction of training text by greedy decoding,
    membership inference (loss, zlib, Min-K%, Min-K%++, reference model) and four backdoor
    detectors; every figure with a bootstrap 95% interval in SEC_DIR/security.json, plots in
    SEC_DIR/security.html. The flat `summary` block (findings_level, max_exposure, mia_auroc,
    backdoor_suspects, ...) is what the registry's gates read.
    """
    from rich.console import Console

    from trustmoe.security.scan import ScanOptions, run_scan

    checks = tuple(c.strip() for item in check for c in item.split(",") if c.strip())
    opts = ScanOptions(checks=checks, n_chunks=chunks, backdoor_chunks=backdoor_chunks, chunk_tokens=chunk_tokens,
                       n_candidates=candidates, reference=reference,
                       reference_steps=reference_steps, seed=seed, batch_size=batch_size)
    summary = run_scan(model, data, out, opts, progress=not (quiet or json_out))
    if json_out:
        typer.echo(json.dumps(summary, sort_keys=True))
        return
    con = Console()
    for k, v in summary.items():
        con.print(f"{k:32} {v}", highlight=False)
    con.print(f"[green]wrote[/] {out / 'security.json'} and {out / 'security.html'}")


def add_commands(security_app: typer.Typer, app: typer.Typer) -> None:
    security_app.command("scan")(scan_cmd)
