"""`trustmoe registry ...`: versions with their evidence, gated promotions, alias history.

Every command takes `--registry URL` (or $TRUSTMOE_REGISTRY; default ~/.trustmoe/registry.db)
and `--blobs DIR` (or $TRUSTMOE_BLOBS; default beside a SQLite file). Reading commands take
`--json`. Printing lives in `registry_show.py`; the work in `trustmoe.deploy`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from trustmoe.deploy.registry import Registry

registry_app = typer.Typer(
    help="Model registry: register versions with their evidence (eval, security, dataset "
    "lineage), promote them through gates, roll back, and see which version an alias held "
    "at any moment.",
    no_args_is_help=True,
)

RegistryOpt = Annotated[str | None, typer.Option(
    "--registry", envvar="TRUSTMOE_REGISTRY", show_envvar=True,
    help="Registry database: a SQLite path or a postgresql:// URL (default "
    "~/.trustmoe/registry.db).")]
BlobsOpt = Annotated[Path | None, typer.Option(
    "--blobs", envvar="TRUSTMOE_BLOBS", show_envvar=True,
    help="Blob store directory (default: REGISTRY.blobs beside a SQLite file).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
AtOpt = Annotated[str | None, typer.Option(
    "--at", help="ISO 8601 time: answer as of then (Z for UTC; no zone = local time).")]


def register(app: typer.Typer) -> None:
    """Add the `registry` group to the main app."""
    app.add_typer(registry_app, name="registry")


def _open(url: str | None, blobs: Path | None, create: bool = False) -> Registry:
    from trustmoe.deploy.registry import Registry

    return Registry.open(url, blobs=blobs, create=create)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@registry_app.command("add", no_args_is_help=True)
def add_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout, "
                                              "safetensors weights).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Registered model name.")],
    eval_dir: Annotated[Path | None, typer.Option("--eval", help="Eval dir from `trustmoe "
                                                  "eval` (stored whole, incl. profile.*).")] = None,
    security_dir: Annotated[Path | None, typer.Option("--security", help="Security dir from "
                                                      "`trustmoe security scan`.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data", help="Training dataset dir, for "
                                                  "its contamination audit (must match the "
                                                  "model's dataset manifest SHA-256).")] = None,
    why: Annotated[str, typer.Option("--why", help="Why this version exists.")] = "",
    train_state: Annotated[bool, typer.Option("--with-train-state", help="Also store a "
                                              "checkpoint's optimizer state (left out by "
                                              "default: serving never reads it).")] = False,
    pubkey: Annotated[list[Path] | None, typer.Option(
        "--pubkey", help="Require MODEL_DIR to be signed (`trustmoe sign`) by this Ed25519 public "
        "key (repeatable; adds to the gates file's [signatures] keys).")] = None,
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register MODEL_DIR (and its evidence) as the next version of --name.

    Prints the version number. Files are stored once by SHA-256 (shared between versions); pickle weights are refused.
    The version records its digest, dataset manifest SHA-256, training args, eval and security
    summaries, who, when and why. With --pubkey or a gates file with [signatures] require = true,
    an unsigned model, or one not signed by a trusted key, is refused; the signing key's
    fingerprint is recorded.
    """
    from trustmoe.cli.registry_show import AddProgress

    reg = _open(registry, blobs, create=True)
    err = _err()
    signatures = reg.signature_policy().with_keys(pubkey) if pubkey else None
    with AddProgress(err, enabled=not as_json) as bar:
        info = reg.add(model_dir, name, eval_dir=eval_dir, security_dir=security_dir,
                       data_dir=data_dir, why=why, progress=bar.advance, train_state=train_state,
                       notice=lambda m: err.print(f"[yellow]note:[/] {m}"), signatures=signatures)
    if as_json:
        _echo_json({**info.to_dict(), "registry": reg.url})
        return
    sig = info.metadata.get("signature") or {}
    signed = f"  signed by {sig['key']}" if sig.get("verified") else ""
    typer.echo(f"{info.name} v{info.version}  sha256:{info.digest}{signed}")


@registry_app.command("list")
def list_cmd(
    name: Annotated[str | None, typer.Argument(help="List this model's versions.")] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="Only what this alias points "
                                              "at (across all models).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only versions trained on "
                                                "this dataset manifest SHA-256 (prefix).")] = None,
    at: AtOpt = None,
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Models with their aliases; with NAME, its versions; with --alias, what an alias holds."""
    from trustmoe.cli import registry_show as show
    from trustmoe.deploy.records import check_alias, parse_time

    when = parse_time(at) if at else None
    reg = _open(registry, blobs)
    if alias is not None:
        hits = reg.find_alias(check_alias(alias), when)
        if name is not None:
            hits = [h for h in hits if h[0] == name]
        rows = [reg.get(f"{n}@{v}").to_dict() | {"alias": alias} for n, v in hits]
        _echo_json(rows) if as_json else show.versions_table(rows, f"alias {alias}")
        return
    if name is None:
        models = [m.to_dict() for m in reg.models()]
        _echo_json(models) if as_json else show.models_table(models)
        return
    versions = [v.to_dict() for v in reg.versions(name)]
    if dataset:
        versions = [v for v in versions if str(v["metadata"].get("dataset_manifest_sha256")
                                               or "").startswith(dataset)]
    _echo_json(versions) if as_json else show.versions_table(versions, name)


@registry_app.command("show", no_args_is_help=True)
def show_cmd(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS (registry: "
                                       "prefix allowed).")],
    at: AtOpt = None,
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One version: digest, lineage, metrics, files, aliases.

    NAME@ALIAS --at T shows which version the alias held at time T, and the history entry
    that set it.
    """
    from trustmoe.cli import registry_show as show
    from trustmoe.deploy.records import parse_ref, parse_time

    when = parse_time(at) if at else None
    r = parse_ref(ref)
    reg = _open(registry, blobs)
    info = reg.get(ref, when)
    out = info.to_dict()
    if r.alias is not None:
        ev = reg.alias_holder(r.name, r.alias, when)
        out["alias_event"] = ev.to_dict() if ev else None
        out["as_of"] = when.isoformat() if when else None
    out["files"] = {part: [e.__dict__ for e in reg.files(info.name, info.version, part)]
                    for part in ("model", "eval", "security")}
    _echo_json(out) if as_json else show.version_detail(out)


@registry_app.command("path", no_args_is_help=True)
def path_cmd(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS.")],
    at: AtOpt = None,
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify a version's files and print the read-only directory that holds them.

    E.g. `trustmoe serve $(trustmoe registry path demo@production)`. A changed or missing
    file is refused with its name.
    """
    from trustmoe.deploy.records import parse_time

    r = _open(registry, blobs).resolve(ref, parse_time(at) if at else None)
    if as_json:
        _echo_json({"name": r.name, "version": r.version, "digest": r.digest, "path": str(r.path),
                    "eval_path": str(r.eval_path) if r.eval_path else None,
                    "security_path": str(r.security_path) if r.security_path else None})
        return
    typer.echo(str(r.path))


@registry_app.command("promote", no_args_is_help=True)
def promote_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Argument(help="Version to promote.", min=1)],
    alias: Annotated[str, typer.Option("--alias", "-a", help="Alias to move (production, "
                                       "canary, ...).")],
    why: Annotated[str, typer.Option("--why", help="Why (recorded in the alias history).")] = "",
    force: Annotated[bool, typer.Option("--force", help="Override failed gates (needs --why; "
                                        "recorded).")] = False,
    gates: Annotated[Path | None, typer.Option("--gates", envvar="TRUSTMOE_GATES",
                                               help="Gates policy file (default: gates.toml "
                                               "beside the registry, else built-in).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the gates; change "
                                          "nothing.")] = False,
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point --alias at VERSION if every promotion gate passes.

    A refusal lists each failed gate with both values; --force --why overrides and is
    recorded. Of two promoters at once, one wins and the other gets a conflict error and
    writes nothing.
    """
    from trustmoe.cli import registry_show as show
    from trustmoe.deploy.aliases import GateRefusal, check_gates

    reg = _open(registry, blobs)
    if dry_run:
        report = check_gates(reg, name, version, alias, gates)
        _echo_json(report.to_dict()) if as_json else show.gate_report(report)
        if not report.passed:
            raise SystemExit(1)
        return
    try:
        res = reg.promote(name, version, alias, why=why, force=force, policy=gates)
    except GateRefusal as e:
        if as_json:
            _echo_json(e.report.to_dict())
        raise
    _echo_json(res.to_dict()) if as_json else show.move_result(res)


@registry_app.command("rollback", no_args_is_help=True)
def rollback_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str, typer.Option("--alias", "-a", help="Alias to move back.")],
    why: Annotated[str, typer.Option("--why", help="Why (recorded in the alias history).")] = "",
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point --alias back at its previous holder (repeat to step further back)."""
    from trustmoe.cli import registry_show as show

    res = _open(registry, blobs).rollback(name, alias, why)
    _echo_json(res.to_dict()) if as_json else show.move_result(res)


@registry_app.command("history", no_args_is_help=True)
def history_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option("--alias", "-a", help="Only this alias.")] = None,
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The append-only alias history (and version registrations), oldest first."""
    from trustmoe.cli import registry_show as show

    reg = _open(registry, blobs)
    events = [e.to_dict() for e in reg.history(name, alias)]
    versions = [] if alias else [v.to_dict() for v in reg.versions(name)]
    if as_json:
        _echo_json({"name": name, "alias": alias, "events": events, "versions": versions})
        return
    show.history_table(name, events, versions)


@registry_app.command("verify")
def verify_cmd(
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every blob; check digests and alias histories. Exit 1 on any problem."""
    from trustmoe.cli.registry_show import AddProgress

    reg = _open(registry, blobs)
    with AddProgress(_err(), enabled=not as_json, verb="verify") as bar:
        rep = reg.verify(progress=bar.advance)
    if as_json:
        _echo_json(rep.to_dict())
    else:
        for p in rep.problems:
            typer.echo(f"problem: {p}", err=True)
        typer.echo(f"{'ok' if rep.ok else 'FAILED'}: {rep.versions} versions, "
                   f"{rep.blobs_checked} blobs ({rep.bytes_checked:,} bytes) re-hashed, "
                   f"{len(rep.problems)} problems")
    if not rep.ok:
        raise SystemExit(1)


@registry_app.command("gc")
def gc_cmd(
    grace_minutes: Annotated[float, typer.Option("--grace-minutes", min=0, help="Keep "
                                                 "unreferenced files younger than this (a "
                                                 "running `add` writes files first).")] = 60.0,
    registry: RegistryOpt = None,
    blobs: BlobsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove blobs no version references (left by interrupted adds) and stale temp files."""
    rep = _open(registry, blobs).gc(grace_minutes * 60)
    if as_json:
        _echo_json(rep.__dict__)
        return
    typer.echo(f"removed {rep.blobs_removed} blobs ({rep.bytes_freed:,} bytes), "
               f"{rep.trees_removed} trees, {rep.tmp_removed} temp files; kept {rep.blobs_kept} blobs")


@registry_app.command("gates")
def gates_cmd(
    gates: Annotated[Path | None, typer.Option("--gates", envvar="TRUSTMOE_GATES",
                                               help="Policy file to check and show.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the promotion gates policy in force (and check a gates file)."""
    from trustmoe.deploy.aliases import find_policy_file
    from trustmoe.deploy.db import resolve_url
    from trustmoe.deploy.gates import DEFAULT_GATES_TOML, load_policy

    path = gates or find_policy_file(resolve_url(registry))
    pol = load_policy(path)
    if as_json:
        _echo_json({"source": pol.source, "sha256": pol.sha256,
                    "gates": [g.__dict__ for g in pol.gates],
                    "signatures": {"require": pol.signatures.require, "keys": list(pol.signatures.keys)}})
        return
    typer.echo(f"# policy: {pol.source} (sha256 {pol.sha256[:12]}...)")
    typer.echo(Path(path).read_text(encoding="utf-8") if path else DEFAULT_GATES_TOML, nl=False)


def register_demo(out: Path, model_dir: Path, eval_dir: Path | None, data_dir: Path | None,
                  console: Console) -> dict[str, Any]:
    """`trustmoe demo`'s registry step: register the model in OUT/registry.db, promote it to
    production through the default gates, print the registry line and return it as JSON
    (name, version, digest, db, alias or None, refused: the first gate's refusal or None)."""
    from trustmoe.deploy.aliases import GateRefusal
    from trustmoe.deploy.registry import Registry

    db_path = (out / "registry.db").absolute()
    with Registry.open(db_path) as reg:
        has_eval = eval_dir is not None and (eval_dir / "eval.json").exists()
        info = reg.add(model_dir, "demo", eval_dir=eval_dir if has_eval else None,
                       data_dir=data_dir, why="trustmoe demo")
        line = f"registry: demo v{info.version}  sha256:{info.digest[:16]}...  ({db_path})"
        rec: dict[str, Any] = {"name": "demo", "version": info.version, "digest": info.digest,
                               "db": str(db_path), "alias": None, "refused": None}
        try:
            res = reg.promote("demo", info.version, "production",
                              why="trustmoe demo: gates passed")
            gates = res.report.results if res.report is not None else ()
            passed = sum(r.status == "pass" for r in gates)
            line += f"\n  -> production ({passed} gates passed, {sum(r.status == 'skip' for r in gates)}"
            line += " skipped for missing inputs)"
            rec["alias"] = "production"
        except GateRefusal as e:
            why = str(e).split("\n", 1)[-1]
            rec["refused"] = why.strip().split("\n")[0]
            line += "\n  not promoted: " + why.replace("\n", "\n  ")
        console.print(line, markup=False, highlight=False)
        console.print(f"  see: trustmoe registry show demo@production --registry {db_path}",
                      markup=False, highlight=False)
        return rec


if __name__ == "__main__":  # pragma: no cover
    sys.exit(registry_app())
