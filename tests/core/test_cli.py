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


def run_cli_without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a Python where `import module` fails, as on a machine without it."""
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = ['trustmoe', *{list(args)!r}]; "
            "from trustmoe.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_missing_optional_extra_is_one_line(tmp_path: Path) -> None:
    from trustmoe.config import get_preset
    from trustmoe.model.hf import save_model
    from trustmoe.model.transformer import Transformer

    model_dir = tmp_path / "m"
    save_model(Transformer(get_preset("tiny").model), model_dir)
    proc = run_cli_without("gguf", "export", "gguf", str(model_dir), str(tmp_path / "m.gguf"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "pip install 'trustmoe[export]'" in lines[0], proc.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_missing_base_dependency_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i} * 2 - 1\n" * 5)
    proc = run_cli_without("datasketch", "data", "build", str(src), "--out", str(tmp_path / "d"),
                           "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "'datasketch' is missing" in proc.stderr and "reinstall" in proc.stderr, proc.stderr
