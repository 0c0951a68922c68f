"""`trustmoe data build|verify` as a user runs them: JSON out, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _in_process(args: list[str], monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from trustmoe.cli import main

    monkeypatch.setattr(sys, "argv", ["trustmoe", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0), out, err


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from trustmoe.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_build_json_then_verify(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    r = _cli("data", "build", str(corpus), "--out", str(out), "--vocab-size", "300",
             "--dedup", "exact", "--license", "MIT", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["dropped_by_rule"]["exact_duplicate"] == 1
    assert "near_duplicate" not in summary["dropped_by_rule"]  # --dedup exact
    assert summary["audit"]["pii_findings"] >= 6
    assert len(summary["manifest_sha256"]) == 64
    r = _cli("data", "verify", str(out), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    (corpus / "docs/doc001.txt").write_text("swapped\n")
    r = _cli("data", "verify", str(out))
    assert r.returncode == 1
    assert "changed   corpus/docs/doc001.txt" in r.stdout and "MISMATCH" in r.stdout


def test_bad_input_is_one_line_and_nonzero(corpus: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    cases = [
        (["data", "build", str(tmp_path / "missing"), "--out", str(out)], "source not found"),
        (["data", "build", str(corpus), "--out", str(out), "--license", "Nope-1"],
         "unknown SPDX"),
        (["data", "build", str(corpus), "--out", str(out), "--eval-set",
          str(tmp_path / "none.jsonl")], "eval set not found"),
        (["data", "verify", str(tmp_path / "nothing")], "data directory not found"),
    ]
    for args, message in cases:
        code, _, err = _in_process(args, monkeypatch, capsys)
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_help_explains(monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = _in_process(["data", "build", "--help"], monkeypatch, capsys)
    assert code == 0
    for flag in ("--allow-license", "--eval-set", "--decontaminate", "--pii", "--dedup",
                 "--vocab-size", "--seed", "--json", "stdlib"):
        assert flag in out


def test_rule_flags_reach_the_build(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    args = ["data", "build", str(corpus), "--out", str(out), "--vocab-size", "300", "--json",
            "--near-threshold", "0.99", "--min-chars", "1", "--pii", "keep"]
    code, stdout, err = _in_process(args, monkeypatch, capsys)
    assert code == 0, err
    dropped = json.loads(stdout)["dropped_by_rule"]
    assert "near_duplicate" not in dropped and "too_short" not in dropped  # both loosened
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["near"]["threshold"] == 0.99
    assert manifest["options"]["quality"]["min_chars"] == 1 and manifest["options"]["pii"] == "keep"
