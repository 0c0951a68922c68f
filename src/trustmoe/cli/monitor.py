"""`trustmoe monitor ...`: drift and SLO monitoring offline (replay, profile, explain) and the
incidents kept in the registry database (status, incidents, ack)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from trustmoe.io import TrustmoeError

monitor_app = typer.Typer(
    help="Watch a model's traffic for drift and broken service levels; replay logs offline; "
    "list and acknowledge incidents.",
    no_args_is_help=True,
)

REGISTRY_HELP = ("Registry database: an SQLAlchemy URL or a SQLite path (default $TRUSTMOE_REGISTRY, "
                 "else ~/.trustmoe/registry.db). Incidents live in its `incidents` table.")


def register(app: typer.Typer) -> None:
    app.add_typer(monitor_app, name="monitor")


def _policy(path: Path | None, window: int | None, ert: float | None) -> Any:
    import dataclasses

    from trustmoe.deploy.policy import load_policy

    pol = load_policy(path)
    if window is None and ert is None:
        return pol
    pol = dataclasses.replace(pol, window=window or pol.window, ert_requests=ert or pol.ert_requests)
    if pol.window < 2:
        raise TrustmoeError(f"--window must be at least 2, got {pol.window}")
    worst = max(d.consecutive for d in pol.detectors.values())
    if pol.ert_requests <= pol.window * worst:
        raise TrustmoeError(f"--ert ({pol.ert_requests:g}) must exceed window x consecutive "
                            f"({pol.window} x {worst})")
    return pol


def _model_dir(model_dir: Path | None, profile: Any) -> Path:
    if model_dir is None:
        src = profile.meta.get("source", {}).get("model_dir")
        if not src:
            raise TrustmoeError("the profile does not name its model directory: pass --model")
        model_dir = Path(src)
    if not Path(model_dir).is_dir():
        raise TrustmoeError(f"model directory not found: {model_dir}")
    return Path(model_dir)


def _model_and_tokenizer(model_dir: Path) -> tuple[Any, Any]:
    from trustmoe.data.tokenizer import load_tokenizer
    from trustmoe.model.hf import load

    return load(model_dir), load_tokenizer(model_dir)


def _chat_renderer(model_dir: Path) -> Any:
    try:
        from trustmoe.serve.chat import ChatTemplate
    except ImportError:  # the serve extra (jinja2) is not installed
        return None
    try:
        tmpl = ChatTemplate.from_model_dir(model_dir)
    except ValueError as e:
        raise TrustmoeError(f"{model_dir}: {e}") from None
    return tmpl.render


def _progress(total: int, label: str, show: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                 TimeElapsedColumn(), disable=not show, transient=True)
    return p


@monitor_app.command("replay", no_args_is_help=True)
def replay_command(
    requests: Path = typer.Argument(..., help='JSONL: one {"prompt": ...} or chat {"messages": [...]} per line; '
                                    'optional "id", "time", "latency_s", "ttft_s", "error", "guard_blocked".'),
    profile: Path = typer.Option(..., "--profile", help="Eval dir (or profile dir) holding profile.json + "
                                 "profile.safetensors: the reference."),
    model: Path | None = typer.Option(None, "--model", help="Model directory (default: the one the profile "
                                      "was made with)."),
    policy: Path | None = typer.Option(None, "--policy", help="monitor.toml (default: built-in policy)."),
    window: int | None = typer.Option(None, "--window", help="Override [monitor].window (requests per window)."),
    ert: float | None = typer.Option(None, "--ert", help="Override [monitor].ert_requests (mean requests "
                                     "between false alarms)."),
    version: str = typer.Option("replay", "--version", help="Version name to put on the incidents."),
    store: bool = typer.Option(False, "--store", help="Also store the incidents in the registry database."),
    registry: str | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run the model and the detectors over logged or prepared traffic; report the incidents the monitor would have opened (no action is taken)."""  # noqa: E501
    from trustmoe.deploy.incidents import IncidentStore, MemorySink
    from trustmoe.deploy.monitor import VersionInfo
    from trustmoe.deploy.replay import read_requests, replay
    from trustmoe.eval.profile import load_profile, trained_on
    from trustmoe.io import sha256_file

    pol = _policy(policy, window, ert)
    prof = load_profile(profile)
    model_dir = _model_dir(model, prof)
    reqs = read_requests(requests, _chat_renderer(model_dir))  # bad input fails before the model loads
    m, tok = _model_and_tokenizer(model_dir)
    weights = model_dir / "model.safetensors"
    info = VersionInfo(version, digest=sha256_file(weights) if weights.exists() else None,
                       dataset_manifest_sha256=trained_on(model_dir))
    sink: Any = MemorySink()
    if store:
        sink = _StoreDryRun(IncidentStore(registry))
    with _progress(len(reqs), "replay", not as_json) as bar:
        task = bar.add_task("", total=len(reqs))
        report = replay(reqs, m, tok, prof, pol, info, sink=sink, batch_size=batch_size,
                        on_progress=lambda n: bar.advance(task, n))
    out = report.to_dict()
    src = prof.meta.get("source", {})
    if info.digest and src.get("model_sha256") and src["model_sha256"] != info.digest:
        out["note"] = "the model differs from the one the profile was made with (a model swap shows as drift)"
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    _print_replay(out)


class _StoreDryRun:
    """Store incidents in the registry database; act on none (replay is offline)."""

    def __init__(self, store: Any) -> None:
        from trustmoe.deploy.incidents import MemorySink

        self.store_, self.dry = store, MemorySink()

    def store(self, incident: Any) -> None:
        self.store_.store(incident)

    def act(self, incident: Any) -> Any:
        return self.dry.act(incident)


def _print_replay(out: dict[str, Any]) -> None:
    from rich.console import Console

    con = Console()
    con.print(f"replayed {out['requests']} requests ({out['scored']} scored, {len(out['skipped'])} skipped)")
    for s in out["skipped"][:10]:
        con.print(f"  skipped line {s['line']}: {s['reason']}", highlight=False)
    v = next(iter(out["status"]["versions"].values()))
    con.print(f"{v['windows']} drift windows, {v['pending']} requests left in an unfinished window")
    for name, d in v["detectors"].items():
        hist = d["history"]
        crossed = sum(h["crossed"] for h in hist)
        con.print(f"[bold]{name}[/]: {crossed} of {len(hist)} windows crossed", highlight=False)
        con.print(f"  {d['explain']}", highlight=False, soft_wrap=True)
    incs = out["incidents"]
    con.print(f"[bold]{len(incs)} incident(s) would have been opened[/]")
    for i in incs:
        con.print(f"  {i['id']}  {i['detector']}  requests {i['window']['first_request']}-"
                  f"{i['window']['last_request']}  statistic {i['statistic']:.4g} (threshold "
                  f"{i['threshold']:.4g})  action: {i['action']} -> {i['action_result']}", highlight=False)
    if "note" in out:
        con.print(f"note: {out['note']}")


@monitor_app.command("profile", no_args_is_help=True)
def profile_command(
    requests: Path = typer.Argument(..., help="JSONL of representative traffic (same format as replay)."),
    model: Path = typer.Option(..., "--model", help="Model directory."),
    out: Path = typer.Option(..., "--out", help="Directory to write profile.json + profile.safetensors into."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile summary as JSON."),
) -> None:
    """Build a reference profile from traffic you trust, instead of the eval's held-out documents."""
    from trustmoe.deploy.replay import read_requests
    from trustmoe.eval.profile import profile_from_prompts, save_profile, trained_on
    from trustmoe.io import sha256_file

    model_dir = _model_dir(model, None)
    reqs = read_requests(requests, _chat_renderer(model_dir))
    m, tok = _model_and_tokenizer(model_dir)
    limit = m.config.max_position_embeddings
    ids = [t for r in reqs if 1 <= len(t := tok.encode(r.text, add_special_tokens=False).ids) <= limit]
    if len(ids) < 2:
        raise TrustmoeError(f"{requests}: fewer than 2 usable prompts (empty or longer than {limit} tokens)")
    weights = model_dir / "model.safetensors"
    source = {"kind": "traffic", "prompts": str(requests), "requests_sha256": sha256_file(requests),
              "model_dir": str(model_dir), "model_sha256": sha256_file(weights) if weights.exists() else None,
              "dataset_manifest_sha256": trained_on(model_dir)}
    prof = profile_from_prompts(m, ids, source, batch_size=batch_size)
    save_profile(prof, out)
    summary = {"profile": str(out / "profile.json"), "requests": prof.n_requests, "skipped": len(reqs) - len(ids),
               "summary": prof.meta["summary"]}
    typer.echo(json.dumps(summary, indent=2) if as_json else
               f"profile of {prof.n_requests} requests written to {out} ({summary['skipped']} skipped)")


@monitor_app.command("explain", no_args_is_help=True)
def explain_command(
    profile: Path = typer.Option(..., "--profile", help="Eval dir or profile dir."),
    policy: Path | None = typer.Option(None, "--policy", help="monitor.toml (default: built-in policy)."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Calibrate the detectors on a profile and say, in plain words, when each one alarms."""
    from trustmoe.deploy.drift import DriftSuite
    from trustmoe.deploy.slo import SLOTracker
    from trustmoe.eval.profile import load_profile

    pol = _policy(policy, None, None)
    prof = load_profile(profile)
    try:
        suite = DriftSuite(prof, window=pol.window, ert_requests=pol.ert_requests, specs=pol.detectors,
                           seed=pol.seed)
    except ValueError as e:
        raise TrustmoeError(str(e)) from None
    text = {**suite.explain(), **SLOTracker(pol.slo).explain()}
    text = {k: v + (f" Action on an incident: {pol.action_for(k)}." if not v.startswith("Off") else "")
            for k, v in text.items()}
    if as_json:
        typer.echo(json.dumps(text, indent=2))
        return
    for k, v in text.items():
        typer.echo(f"{k}: {v}\n")


@monitor_app.command("status")
def status_command(
    registry: str | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Incidents per version and detector (open and acknowledged), from the registry database."""
    from trustmoe.deploy.incidents import IncidentStore

    st = IncidentStore(registry)
    counts = st.counts()
    open_ = [i.to_dict() for i in st.list(status="open", limit=10)]
    out = {"registry": _safe_url(st.url), **counts, "open_incidents": open_}
    st.close()
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    if not counts["rows"]:
        typer.echo(f"no incidents in {out['registry']}")
        return
    for r in counts["rows"]:
        typer.echo(f"{r['version']:<24} {r['detector']:<28} {r['status']:<6} {r['count']}")
    typer.echo(f"{len(open_)} open incident(s) shown by `trustmoe monitor incidents --status open`")


@monitor_app.command("incidents")
def incidents_command(
    status: str | None = typer.Option(None, "--status", help="open or acked (default: both)."),
    version: str | None = typer.Option(None, "--version", help="Only this model version."),
    limit: int = typer.Option(50, "--limit", min=1, max=10000, help="Most recent first, at most this many."),
    registry: str | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON (every field, with the chain back to "
                                 "the data: digest, dataset manifest sha256, profile)."),
) -> None:
    """List incidents, most recent first."""
    from trustmoe.deploy.incidents import IncidentStore

    if status not in (None, "open", "acked"):
        raise TrustmoeError(f"--status must be open or acked, got {status!r}")
    st = IncidentStore(registry)
    incs = st.list(status=status, version=version, limit=limit)
    st.close()
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in incs], indent=2))
        return
    if not incs:
        typer.echo("no incidents")
    for i in incs:
        typer.echo(f"{i.id}  {i.status:<5}  {i.version}  {i.detector}  statistic {i.statistic:.4g} "
                   f"(threshold {i.threshold:.4g})  action {i.action}: {i.action_result}  "
                   f"data {(i.dataset_manifest_sha256 or '-')[:12]}")


@monitor_app.command("ack", no_args_is_help=True)
def ack_command(
    incident_id: str = typer.Argument(..., help="Incident id (a unique prefix is enough)."),
    by: str | None = typer.Option(None, "--by", help="Who acknowledges (default: $USER)."),
    registry: str | None = typer.Option(None, "--registry", help=REGISTRY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the incident as JSON."),
) -> None:
    """Acknowledge an incident: it stays in the database, marked acked, with who and when."""
    from trustmoe.deploy.incidents import IncidentStore

    st = IncidentStore(registry)
    inc = st.ack(incident_id, by or os.environ.get("USER"))
    st.close()
    typer.echo(json.dumps(inc.to_dict(), indent=2) if as_json else f"acknowledged {inc.id} ({inc.detector}, "
               f"{inc.version})")


def _safe_url(url: str) -> str:
    """The URL without a password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
