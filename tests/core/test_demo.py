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
    assert set(s["seconds"]) == {"data build", "train", "sample", "eval", "total"}
    assert s["seconds"]["total"] >= s["seconds"]["train"] + s["seconds"]["eval"]
    assert s["validation"]["tokens"] > 0 and "tokens of val.bin" in s["validation"]["measured_on"]
    assert "held-out documents, each scored from its start" in s["eval"]["measured_on"]
    # the closing table: both perplexities with what they are measured on, and what's next
    table = proc.stdout.split("demo summary")[1]
    assert "validation (training)" in table and "tokens of val.bin" in table
    assert "eval perplexity" in table and "held-out documents" in table
    assert f"trustmoe serve {out / 'model'}" in table
    assert str(out / "eval" / "report.html") in table and str(out / "data" / "audit.html") in table
    verdict = "within the 60s budget" if s["seconds"]["total"] <= 60 else "over the 60s budget"
    assert verdict in table
    assert "{'" not in proc.stdout  # no raw Python dict
