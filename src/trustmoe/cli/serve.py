"""`trustmoe serve ...` and `trustmoe export gguf ...` commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from trustmoe.config import SERVER_MAX_CONCURRENCY, EngineConfig
from trustmoe.io import TrustmoeError

export_app = typer.Typer(help="Export a model directory to other runtimes' formats.",
                         no_args_is_help=True)


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise TrustmoeError(f"model directory not found: {model_dir}")
    if not (model_dir / "config.json").exists():
        raise TrustmoeError(f"{model_dir} is not a model directory (no config.json)")


_ENGINE = EngineConfig()  # every engine option's default and help come from this one place


def _quantize_mode(value: str) -> str | None:
    """The CLI spells "no quantization" as `none`."""
    return None if value == "none" else value


def serve_command(
    model_ref: str = typer.Argument(..., metavar="MODEL",
                                    help="A model directory (HF Mixtral/Llama), or a registry "
                                         "version: registry:NAME@ALIAS or registry:NAME@VERSION."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    quantize: str = typer.Option(_ENGINE.quantize or "none",
                                 help="Weight-only quantization at load: none, int8 or int4."),
    group_size: int = typer.Option(_ENGINE.group_size, help=EngineConfig.help("group_size")),
    kv_cache_mb: float = typer.Option(_ENGINE.kv_cache_mb, help=EngineConfig.help("kv_cache_mb")),
    kv_cache_dtype: str = typer.Option(_ENGINE.kv_cache_dtype or "auto",
                                       help="KV-cache element type: auto (the weights' dtype, exact) "
                                            "or float16 (half the memory and long-context reads)."),
    block_size: int = typer.Option(_ENGINE.block_size, help=EngineConfig.help("block_size")),
    max_num_seqs: int = typer.Option(_ENGINE.max_num_seqs, help=EngineConfig.help("max_num_seqs")),
    max_queue: int = typer.Option(_ENGINE.max_queue, help=EngineConfig.help("max_queue")),
    prefill_chunk: int = typer.Option(_ENGINE.prefill_chunk,
                                      help=EngineConfig.help("prefill_chunk")),
    device: str = typer.Option(_ENGINE.device, help=EngineConfig.help("device")),
    num_threads: int | None = typer.Option(_ENGINE.num_threads,
                                           help=EngineConfig.help("num_threads")),
    batch_invariant: bool = typer.Option(_ENGINE.batch_invariant,
                                         "--batch-invariant/--no-batch-invariant",
                                         help=EngineConfig.help("batch_invariant")),
    prefix_caching: bool = typer.Option(_ENGINE.enable_prefix_caching,
                                        "--prefix-caching/--no-prefix-caching",
                                        help=EngineConfig.help("enable_prefix_caching")),
    max_concurrency: int = typer.Option(
        SERVER_MAX_CONCURRENCY, min=1,
        help="Most requests (choices) in flight in the server; more get 429."),
    api_key: str = typer.Option("", envvar="TRUSTMOE_API_KEY", show_default=False,
                                help="Require `Authorization: Bearer KEY` on every route but "
                                     "/health (or set TRUSTMOE_API_KEY)."),
    served_model_name: str = typer.Option("", help="Model name clients use (default: dir name)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    guard: Path = typer.Option(None, "--guard", show_default=False,
                               help="Guard policy (guard.toml): prompt-injection scanning, tool "
                                    "allow-list, output secrets/PII/canary. Default: built-in policy."),
    no_guard: bool = typer.Option(False, "--no-guard", help="Turn the request/output guard off."),
    registry: str = typer.Option(None, "--registry", envvar="TRUSTMOE_REGISTRY", show_default=False,
                                 help="Registry database (path or SQLAlchemy URL) for registry: refs. "
                                      "Default: ~/.trustmoe/registry.db."),
    follow: bool = typer.Option(False, "--follow", help="Poll the registry aliases served and "
                                "hot-swap when one moves (in-flight requests finish on the old one)."),
    poll_seconds: float = typer.Option(5.0, "--poll-seconds", help="With --follow: seconds "
                                       "between alias polls (a database read)."),
    canary: str = typer.Option(None, "--canary", show_default=False,
                               help="A second version answering --canary-percent of requests, "
                                    "e.g. NAME@canary (sticky per `user` / x-trustmoe-user)."),
    canary_percent: float = typer.Option(0.0, "--canary-percent",
                                         help="Share of requests (0..100) the canary answers."),
    shadow: str = typer.Option(None, "--shadow", show_default=False,
                               help="A version that gets a copy of --shadow-percent of requests, "
                                    "its output discarded and compared with the answer, e.g. "
                                    "NAME@candidate."),
    shadow_percent: float = typer.Option(100.0, "--shadow-percent",
                                         help="Share of requests (0..100) copied to the shadow."),
    shadow_log: Path = typer.Option(None, "--shadow-log", show_default=False,
                                    help="JSONL file the paired shadow comparisons are appended to."),
    monitor: Path = typer.Option(None, "--monitor", show_default=False,
                                 help="Live monitoring policy (monitor.toml): drift detectors and SLOs "
                                      "per served version against its eval profile, incidents in the "
                                      "registry database, automatic canary/production rollback, "
                                      "webhook; adds GET /dashboard and /dashboard/status.json."),
    log_prompts: bool = typer.Option(False, "--log-prompts",
                                     help="With --monitor: keep raw prompts of sample requests in "
                                          "incidents (default: hashed request ids only)."),
    replicas: int = typer.Option(1, "--replicas", min=1,
                                 help="Run N server replicas behind one address with Ray Serve "
                                      "(needs `pip install 'trustmoe[ray]'`)."),
) -> None:
    """Serve a model with an OpenAI-compatible API (completions, chat, streaming, metrics).

    Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
    GET /ready, GET /metrics (Prometheus), POST /admin/reload (re-read the registry aliases
    now; needs the API key when one is set). Every response carries
    `x-trustmoe-model: name:version@sha256:<digest12>`, the version that answered. The guard
    (on by default) answers 400 with a `guard_<rule>` code to prompt injections and
    jailbreaks, checks `tools` against its policy, and redacts secrets in the output (see
    `--guard`). Requests beyond --max-concurrency or a full queue get 429 with Retry-After.
    Stop with Ctrl-C.

    Examples: `trustmoe serve runs/demo/model`;
    `trustmoe serve registry:demo@production --follow --canary demo@canary --canary-percent 10`.
    """
    from trustmoe.serve.sources import REGISTRY_PREFIX

    if not model_ref.startswith(REGISTRY_PREFIX):
        _check_model_dir(Path(model_ref))
    if shadow_log is not None and not shadow_log.parent.is_dir():
        raise TrustmoeError(f"--shadow-log: directory {shadow_log.parent} does not exist")
    config = EngineConfig(  # ConfigError (one line, exit 2) for a setting that cannot work
        quantize=_quantize_mode(quantize), group_size=group_size, kv_cache_mb=kv_cache_mb,
        kv_cache_dtype=None if kv_cache_dtype == "auto" else kv_cache_dtype, block_size=block_size,
        max_num_seqs=max_num_seqs, max_queue=max_queue,
        prefill_chunk=prefill_chunk, device=device, num_threads=num_threads,
        batch_invariant=batch_invariant, enable_prefix_caching=prefix_caching,
        features=monitor is not None,  # the engine emits what the monitor reads
    )
    on_app = None
    if monitor is not None:
        from trustmoe.deploy.policy import load_policy

        load_policy(monitor)  # a bad policy fails before any model loads
        if replicas > 1:
            raise TrustmoeError("--monitor runs in one server process: use it without --replicas")
        from functools import partial

        from trustmoe.serve.monitoring import attach

        on_app = partial(attach, policy_path=monitor, log_prompts=log_prompts)
    elif log_prompts:
        raise TrustmoeError("--log-prompts needs --monitor")
    from trustmoe.security.guard import Guard, GuardPolicy

    if guard is not None and no_guard:
        raise TrustmoeError("--guard and --no-guard exclude each other")
    guard_obj = Guard(GuardPolicy(enabled=False, model="none")) if no_guard else Guard.from_toml(guard)
    # The engine thread shares the cores with the HTTP event loop. OpenMP workers that spin
    # long after each parallel region starve it (a ~5x collapse measured on 2 cores), and ones
    # that sleep at once pay a wake-up at every barrier of the decode kernels; a short spin
    # (~10-20 us) measured best: 16 clients on bench-small 666 tok/s vs 561 with
    # OMP_WAIT_POLICY=PASSIVE. Must be set before torch loads; the user's settings win.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    from trustmoe.serve.app import serve
    from trustmoe.serve.fleet import ServeConfig

    serve_config = ServeConfig(
        engine=config, registry_url=registry, canary=canary, canary_percent=canary_percent,
        shadow=shadow, shadow_percent=shadow_percent, shadow_log=shadow_log, follow=follow,
        poll_seconds=poll_seconds, max_concurrency=max_concurrency, api_key=api_key or None,
        served_model_name=served_model_name or None, guard=guard_obj).validate()
    if replicas > 1:
        from trustmoe.serve.ray import deployment, run

        typer.echo(f"starting {replicas} replicas under Ray Serve on http://{host}:{port}")
        run(deployment(model_ref, serve_config, replicas=replicas), host=host, port=port,
            blocking=True)
        return
    serve(model_ref, host, port, serve_config=serve_config, log_level=log_level, on_app=on_app)


@export_app.command("gguf")
def export_gguf_command(
    model_dir: Path = typer.Argument(..., help="HF-format Mixtral/Llama model directory."),
    out: Path = typer.Argument(..., help="Output .gguf file (written atomically)."),
    quantize: str = typer.Option("f32", help="Weight type: f32, f16 or q8_0."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Write a GGUF file that llama.cpp runs (llama architecture; Mixtral experts stacked)."""
    _check_model_dir(model_dir)
    from rich.progress import Progress

    from trustmoe.model.gguf import export_gguf

    with Progress(transient=True, disable=as_json) as bar:
        task = bar.add_task("exporting tensors", total=None)
        info = export_gguf(model_dir, out, quantize=quantize,
                           progress=lambda name: bar.update(task, advance=1, description=name))
    if as_json:
        typer.echo(json.dumps(info))
    else:
        typer.echo(f"wrote {info['path']} ({info['bytes'] / 1e6:.1f} MB, {info['tensors']} "
                   f"tensors, {info['quantize']})")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the main app."""
    app.command("serve")(serve_command)
    app.add_typer(export_app, name="export")
