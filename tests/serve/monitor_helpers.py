"""A served-versions stand-in with the fleet's monitoring interface, synthetic features, and a
registry with eval dirs holding profiles: for the live monitor and dashboard tests that are about
the monitor, not the engine (the end-to-end test serves real models)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from trustmoe.deploy.drift import DETECTORS, DetectorSpec
from trustmoe.deploy.policy import Policy, SLOPolicy
from trustmoe.deploy.registry import Registry
from trustmoe.engine.features import RequestFeatures
from trustmoe.eval.profile import build_profile, save_profile

V, D, L, E = 200, 8, 2, 4


def features(rng: np.random.Generator, shift: float = 0.0) -> RequestFeatures:
    """One request: tokens from a Zipf over a fixed vocabulary slice; `shift` moves every signal."""
    n = int(rng.integers(8, 40))
    zipf = 1.0 / np.arange(1, 121) ** 1.1
    ids = rng.choice(120, size=n, p=zipf / zipf.sum())
    if shift:
        ids = np.where(rng.random(n) < shift, rng.integers(150, V, size=n), ids)
    load = np.array([0.4, 0.3, 0.2, 0.1]) if not shift else np.array([0.1, 0.2, 0.3, 0.4])
    routing = np.stack([rng.multinomial(2 * n, load) for _ in range(L)])
    return RequestFeatures(token_ids=ids.astype(np.int64), mean_nll=float(rng.normal(3 + shift, 0.4)),
                           mean_entropy=float(rng.normal(2.5, 0.3)), mean_top1=float(rng.beta(4, 4)),
                           hidden=(rng.normal(size=D) + shift).astype(np.float32),
                           routing=routing.astype(np.int64), n_scored=min(n - 1, 16))


def write_eval_dir(d: Path, seed: int = 0, n: int = 300) -> Path:
    rng = np.random.default_rng(seed)
    prof = build_profile([features(rng) for _ in range(n)], V, {"kind": "synthetic"})
    d.mkdir(parents=True, exist_ok=True)
    save_profile(prof, d)
    (d / "eval.json").write_text(json.dumps({"schema": 1}))
    return d


def traffic(seed: int, n: int, vocab: int) -> list[list[int]]:
    """Prompts of token ids, 8..32 long, ids in [3, vocab) (distinct, so the prefix cache never
    hides positions): the "trusted traffic" of the end-to-end tests."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))] for _ in range(n)]


def tokenizer_vocab(model_dir: Path) -> int:
    """How many ids the server's tokenizer knows (prompt ids beyond it get 400)."""
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size())


def model_eval_dir(model_dir: Path, out: Path, prompts: list[list[int]]) -> Path:
    """An eval dir whose profile is the model's own features on `prompts`."""
    from trustmoe.eval.profile import profile_from_prompts
    from trustmoe.model.hf import load

    save_profile(profile_from_prompts(load(model_dir), prompts, {"kind": "trusted traffic",
                                                                 "model_dir": str(model_dir)}), out)
    (out / "eval.json").write_text(json.dumps({"schema": 1}))
    return out


def policy(**kw: Any) -> Policy:
    base = dict(window=20, ert_requests=2000, consecutive=2, cooldown_requests=200, cooldown_s=0,
                act=("drift", "slo"), action="rollback_canary", sample_requests=3,
                slo=SLOPolicy(window=40, max_error_rate=0.2),
                detectors={d: DetectorSpec(consecutive=2) for d in DETECTORS})
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


@dataclass
class Served:
    key: str
    name: str
    version: int
    digest: str
    role: str
    model_dir: Path
    eval_dir: Path | None
    dataset_manifest_sha256: str | None = "cd" * 32


@dataclass
class Finished:
    version: str
    request_id: str
    status: int = 200
    latency_s: float | None = 0.05
    ttft_s: float | None = 0.01
    prompt_tokens: int = 10
    completion_tokens: int = 4
    guard_blocked: bool = False
    user_hash: str | None = None
    features: RequestFeatures | None = None


@dataclass
class StaticFleet:
    """The monitoring half of `trustmoe.serve.fleet.Fleet`, over a fixed list of versions."""

    served: list[Served]
    percent: float = 20.0
    reloads: int = 0
    finished_fns: list[Callable[[Any], Any]] = field(default_factory=list)
    swap_fns: list[Callable[..., Any]] = field(default_factory=list)

    def versions(self) -> list[Served]:
        return list(self.served)

    def set_canary_percent(self, p: float) -> None:
        self.percent = float(p)

    def canary_percent(self) -> float:
        return self.percent

    def reload(self) -> None:
        self.reloads += 1

    def on_finished(self, fn: Callable[[Any], Any]) -> None:
        self.finished_fns.append(fn)

    def on_swap(self, fn: Callable[..., Any]) -> None:
        self.swap_fns.append(fn)

    def finish(self, fr: Finished) -> None:
        for fn in self.finished_fns:
            fn(fr)

    def swap(self) -> None:
        for fn in self.swap_fns:
            fn()


def registry_with_two(root: Path) -> tuple[Registry, StaticFleet]:
    """demo@1 production, demo@2 canary, both with synthetic profiles in their eval dirs."""
    reg = Registry.open(str(root / "registry.db"), blobs=root / "blobs")
    from trustmoe.deploy.gates import parse_policy

    open_gates = parse_policy('[gates.ece]\nmax = 1e9\nmissing = "skip"\n', "test: open")
    served = []
    for i in (1, 2):
        m = root / f"m{i}"
        m.mkdir()
        save_file({"w": torch.full((4,), float(i))}, str(m / "model.safetensors"))
        (m / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
        (m / "trustmoe.json").write_text(json.dumps({"dataset_manifest_sha256": "cd" * 32}))
        ev = write_eval_dir(root / f"e{i}", seed=0)
        info = reg.add(m, "demo", eval_dir=ev)
        reg.promote("demo", i, "production" if i == 1 else "canary", policy=open_gates, why=f"v{i}")
        served.append(Served(f"demo@{i}", "demo", i, info.digest, "production" if i == 1 else "canary",
                             m, ev))
    return reg, StaticFleet(served)
