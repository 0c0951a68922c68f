"""The CLI as a user meets it: --help everywhere, one clear line and exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trustmoe.train import train


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustmoe.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("cmd", [[], ["train"], ["generate"], ["demo"]])
def test_help(cmd: list[str]) -> None:
    proc = run_cli(*cmd, "--help")
    assert proc.returncode == 0
    assert "Usage" in proc.stdout


def test_train_bad_inputs(tiny_data_dir: Path, tmp_path: Path) -> None:
    assert_clean_failure(run_cli("train", "--data", str(tmp_path / "none"), "--out",
                                 str(tmp_path / "o"), "--preset", "tiny"), "not found")
    assert_clean_failure(run_cli("train", "--data", str(tiny_data_dir), "--out",
                                 str(tmp_path / "o"), "--preset", "gigantic"), "unknown preset")
    assert_clean_failure(run_cli("train", "--data", str(tiny_data_dir), "--out",
                                 str(tmp_path / "o"), "--preset", "tiny", "--resume"),
                         "cannot resume")
    assert_clean_failure(run_cli("train", "--data", str(tiny_data_dir), "--out",
                                 str(tmp_path / "o"), "--preset", "tiny", "--max-steps", "-3"),
                         "must be positive")
    empty = tmp_path / "emptydata"
    empty.mkdir()
    (empty / "tokenizer.json").write_text((tiny_data_dir / "tokenizer.json").read_text())
    (empty / "train.bin").write_bytes(b"")
    (empty / "val.bin").write_bytes(b"")
    assert_clean_failure(run_cli("train", "--data", str(empty), "--out", str(tmp_path / "o"),
                                 "--preset", "tiny"), "empty")


def test_train_and_generate_cli(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = run_cli("train", "--data", str(tiny_data_dir), "--out", str(out), "--preset", "tiny",
                   "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 3 and summary["val_loss"] > 0
    gen = run_cli("generate", str(out), "def func_1(x, y):", "--max-tokens", "5", "--json")
    assert gen.returncode == 0, gen.stderr
    g = json.loads(gen.stdout)
    assert len(g["token_ids"]) == 5 and isinstance(g["text"], str)
    assert_clean_failure(run_cli("generate", str(tmp_path / "nomodel"), "hi"), "not found")
    assert_clean_failure(run_cli("generate", str(out), "hi", "--max-tokens", "0"), "max-tokens")


def test_generate_is_deterministic_with_seed(tiny_data_dir: Path, tmp_path: Path) -> None:
    from trustmoe.generation import generate_text

    out = tmp_path / "m"
    train(tiny_data_dir, out, "tiny", max_steps=2, progress=False,
          overrides={"batch_size": 2, "seq_len": 32})
    a = generate_text(out, "def", max_tokens=8, temperature=1.0, seed=3)
    b = generate_text(out, "def", max_tokens=8, temperature=1.0, seed=3)
    assert a == b
