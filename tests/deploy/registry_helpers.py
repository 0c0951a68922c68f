"""Small model/eval/security dirs for the registry tests, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trustmoe.deploy.registry import Registry
from trustmoe.io import sha256_file


@dataclass
class Backend:
    """Where a test's registry lives: SQLite in tmp_path, or a fresh PostgreSQL database."""

    name: str
    url: str
    blobs: Path

    def open(self) -> Registry:
        return Registry.open(self.url, blobs=self.blobs)


def make_model(d: Path, seed: int = 0, size: int = 16, dataset_sha: str | None = "ab" * 32,
               extra: dict[str, bytes] | None = None) -> Path:
    """A model dir in the HF layout (random safetensors, config, trustmoe.json)."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"model.embed_tokens.weight": torch.randn(size, 4, generator=g)},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 4,
                                               "num_local_experts": 4, "vocab_size": size}))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "shared": True}))
    meta: dict[str, Any] = {"preset": "tiny", "step": 10 + seed, "train_args": {"lr": 0.001}}
    if dataset_sha:
        meta["dataset_manifest_sha256"] = dataset_sha
    (d / "trustmoe.json").write_text(json.dumps(meta))
    for name, data in (extra or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return d


def make_eval(d: Path, model: Path | None = None, perplexity: float | None = 10.0,
              ece: float | None = 0.05, summary: dict[str, Any] | None = None,
              profile: bool = False) -> Path:
    """An eval dir shaped like `trustmoe eval`'s eval.json (nested keys), optionally with a
    flat summary block and a reference profile."""
    d.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"schema": 1}
    if perplexity is not None:
        res["perplexity"] = {"perplexity": perplexity, "bits_per_byte": 1.5}
    if ece is not None:
        # `ece` is the served model's (T = 1); temperature scaling halves it here
        res["calibration"] = {"next_token": {"test_before": {"ece_15_equal_width": ece},
                                             "test_after": {"ece_15_equal_width": ece / 2}}}
    if model is not None:
        res["model"] = {"weights_sha256": sha256_file(model / "model.safetensors")}
    res["tasks"] = {"next-words": {"acc": 0.4}}
    if summary is not None:
        res["summary"] = summary
    (d / "eval.json").write_text(json.dumps(res))
    (d / "report.html").write_text("<html>report</html>")
    if profile:
        save_file({"token_freq": torch.ones(8)}, str(d / "profile.safetensors"))
        (d / "profile.json").write_text(json.dumps({"tokens": 8}))
    return d


def make_security(d: Path, findings: list[dict[str, Any]] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "security.json").write_text(json.dumps({"findings": findings or []}))
    return d


def cli_env(url: str, blobs: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TRUSTMOE_REGISTRY=url, TRUSTMOE_BLOBS=str(blobs))
    env.pop("TRUSTMOE_GATES", None)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustmoe.cli", "registry", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert needle.lower() in proc.stderr.lower(), proc.stderr


def open_policy() -> Any:
    """A gates policy that lets anything through (for tests about something else)."""
    from trustmoe.deploy.gates import parse_policy

    return parse_policy('[gates.ece]\nmax = 1e9\nmissing = "skip"\n', "test: open")
