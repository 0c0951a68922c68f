"""`trustmoe demo` as a newcomer runs it, in a log (not a terminal): plain training
progress, both perplexities named with what they measure, a readable closing table with
the next commands, and the time of each stage against the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import synthetic_docs


@pytest.mark.slow
def test_demo_end_to_end_in_a_log(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(synthetic_docs(200)):
        (src / f"mod{i:03d}.py").write_text(doc)
    out = tmp_path / "demo"
    env = dict(os.environ, COLUMNS="160")
    proc = subprocess.run(
        [sys.executable, "-m", "trustmoe.cli", "demo", "--minutes", "1", "--preset", "tiny",
         "--source", str(src), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    assert "train step" in proc.stderr and "tok/s" in proc.stderr  # plain progress in a log
    s = json.loads((out / "summary.json").read_text())
    assert s["model"]["steps"] > 0 and s["eval"] is not None
    assert set(s["seconds"]) == {"data build", "train", "sample", "eval", "registry", "total"}
    reg = s["registry"]  # registered with its evidence, and promoted through the default gates
    assert reg["name"] == "demo" and reg["version"] == 1 and len(reg["digest"]) == 64
    assert (reg["alias"] == "production") != (reg["refused"] is not None), reg
    assert s["seconds"]["total"] >= s["seconds"]["train"] + s["seconds"]["eval"]
    assert s["validation"]["tokens"] > 0 and "tokens of val.bin" in s["validation"]["measured_on"]
    assert "held-out documents, each scored from its start" in s["eval"]["measured_on"]
    # the closing table: both perplexities with what they are measured on, and what's next
    table = proc.stdout.split("demo summary")[1]
    assert "validation (training)" in table and "tokens of val.bin" in table
    assert "eval perplexity" in table and "held-out documents" in table
    assert "registry" in table and "demo v1 sha256:" in table
    assert f"trustmoe serve {out / 'model'}" in table
    assert str(out / "eval" / "report.html") in table and str(out / "data" / "audit.html") in table
    verdict = "within the 60s budget" if s["seconds"]["total"] <= 60 else "over the 60s budget"
    assert verdict in table
    assert "{'" not in proc.stdout  # no raw Python dict


def test_starved_training_is_said_plainly() -> None:
    from types import SimpleNamespace

    from trustmoe.cli.demo import _starved_note

    busy = SimpleNamespace(steps=8, stopped="max_steps", tokens_per_second=196.0)
    note = _starved_note(busy, "small", 5)
    assert note and "only 8 training steps" in note and "196 tok/s" in note
    assert "--minutes 10" in note
    quiet = SimpleNamespace(steps=240, stopped="max_steps", tokens_per_second=1900.0)
    assert _starved_note(quiet, "small", 5) is None
    full = SimpleNamespace(steps=50, stopped="max_steps", tokens_per_second=9000.0)
    assert _starved_note(full, "tiny", 1) is None  # the preset's whole schedule ran


def test_summary_table_reports_overrun_and_next_commands() -> None:
    from rich.console import Console

    from trustmoe.cli.demo import next_steps, summary_table

    s = {
        "out": "runs/demo", "budget_s": 300.0, "note": None,
        "seconds": {"data build": 40.0, "train": 200.0, "sample": 5.0, "eval": 80.0,
                    "total": 325.0},
        "data": {"dir": "runs/demo/data", "documents": 734, "kept": 713,
                 "tokens": {"train": 3_240_730, "val": 134_891},
                 "audit_html": "runs/demo/data/audit.html"},
        "model": {"dir": "runs/demo/model", "preset": "small", "experts": 8, "top_k": 2,
                  "steps": 120, "tokens": 245_760, "tokens_per_s": 1228.8, "stopped": "time"},
        "validation": {"loss": 6.07, "perplexity": 433.6, "tokens": 8192,
                       "measured_on": "8,192 tokens of val.bin: ..."},
        "eval": {"perplexity": 691.4, "bits_per_byte": 2.1, "tasks": {"next-line": 0.3},
                 "measured_on": "the first 192 tokens of 48 held-out documents",
                 "report": "runs/demo/eval/report.html"},
    }
    con = Console(width=200, record=True, force_terminal=False)
    con.print(summary_table(s))
    con.print(next_steps(s))
    text = con.export_text()
    assert "perplexity 433.60 on 8,192 tokens of val.bin" in text
    assert "691.40 (bits/byte 2.100) on the first 192 tokens of 48 held-out documents" in text
    assert "325s in all, 25s over the 300s budget" in text
    for cmd in ("trustmoe serve runs/demo/model", "open runs/demo/eval/report.html",
                "open runs/demo/data/audit.html", "cat runs/demo/summary.json"):
        assert cmd in text
