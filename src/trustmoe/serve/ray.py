"""Ray Serve: N replicas of the trustmoe server behind one address (the `ray` extra).

Each replica builds its own app with `create_app(model_ref, config)` when Ray starts it (the
app factory keeps no process-global state, so replicas in one worker process would not
collide either), runs its lifespan (engine threads, alias polling with `follow`) and answers
the whole OpenAI API: Ray's proxy spreads requests over the replicas; every response still
names its version in `x-trustmoe-model`, and `GET /ready` names the replica's process.

    >>> from trustmoe.serve.ray import deployment, run
    >>> app = deployment("registry:demo@production", ServeConfig(follow=True), replicas=2)
    >>> run(app, host="127.0.0.1", port=8000)     # starts (or joins) Ray; returns once up

The guard is built inside each replica from `config.guard`'s policy (default: the built-in
one). Replicas share nothing: a canary split is sticky per user on every replica because the
bucket comes from the hash of the user key alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from trustmoe.io import TrustmoeError
from trustmoe.serve.fleet import ServeConfig

DEPLOYMENT_NAME = "trustmoe"


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise TrustmoeError("serving through Ray needs the optional package 'ray[serve]', which "
                            "is not installed: pip install 'trustmoe[ray]'") from None
    return serve


def deployment(model_ref: str | Path, config: ServeConfig | None = None, *, replicas: int = 1,
               ray_actor_options: dict[str, Any] | None = None) -> Any:
    """A bound Ray Serve application of `replicas` trustmoe servers (pass it to `run` or to
    `ray.serve.run`)."""
    serve = _ray_serve()
    if replicas < 1:
        raise TrustmoeError(f"replicas must be >= 1, got {replicas}")
    cfg = (config or ServeConfig()).validate()
    policy = cfg.guard.policy if cfg.guard is not None else None
    cfg = dataclasses.replace(cfg, guard=None)  # rebuilt in each replica from its policy
    ref = _absolute(str(model_ref))  # replicas may run in another working directory
    if cfg.registry_url and "://" not in cfg.registry_url:
        cfg = dataclasses.replace(cfg, registry_url=str(Path(cfg.registry_url).expanduser().absolute()))
    cfg = dataclasses.replace(cfg, canary=cfg.canary and _absolute(cfg.canary),
                              shadow=cfg.shadow and _absolute(cfg.shadow))

    def build_app() -> Any:  # runs in each replica
        from trustmoe.security.guard import Guard
        from trustmoe.serve.app import create_app

        guard = Guard(policy) if policy is not None else None
        return create_app(ref, dataclasses.replace(cfg, guard=guard))

    ingress = serve.ingress(build_app)()
    options: dict[str, Any] = {"name": DEPLOYMENT_NAME, "num_replicas": replicas}
    if ray_actor_options:
        options["ray_actor_options"] = ray_actor_options
    return serve.deployment(**options)(ingress).bind()


def _absolute(ref: str) -> str:
    from trustmoe.serve.sources import REGISTRY_PREFIX

    if ref.startswith(REGISTRY_PREFIX) or not Path(ref).expanduser().is_dir():
        return ref
    return str(Path(ref).expanduser().absolute())


def run(app: Any, *, host: str = "127.0.0.1", port: int = 8000, name: str = DEPLOYMENT_NAME,
        blocking: bool = False) -> None:
    """Start Ray Serve's HTTP proxy on host:port (a local Ray if none is running) and deploy
    `app` at `/`; with `blocking`, serve until interrupted."""
    serve = _ray_serve()
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/", blocking=blocking)


def shutdown() -> None:
    serve = _ray_serve()
    import ray

    serve.shutdown()
    if ray.is_initialized():
        ray.shutdown()
