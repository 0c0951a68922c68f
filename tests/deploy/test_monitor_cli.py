"""`trustmoe monitor ...` as a user meets it: JSON out, incidents in the registry database,
one clear line and exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from monitor_fixtures import code_docs, make_model_and_profile, prose, write_jsonl
from typer.testing import CliRunner

from trustmoe.cli import app
from trustmoe.config import ConfigError
from trustmoe.io import TrustmoeError


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command in a fresh process (slow: torch imports); used for a few checks."""
    return subprocess.run([sys.executable, "-m", "trustmoe.cli", "monitor", *args], capture_output=True,
                          text=True, timeout=300)


@dataclass
class Out:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> Out:
    """In process, with the same error handling as `trustmoe.cli.main` (one line, exit 2)."""
    res = CliRunner().invoke(app, ["monitor", *args])
    if isinstance(res.exception, TrustmoeError | ConfigError):
        return Out(2, res.stdout, f"error: {res.exception}\n")
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Out(res.exit_code, res.stdout, "")


def clean_failure(proc: Out | subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    mdir, edir = make_model_and_profile(root)
    rows = [{"prompt": d} for d in code_docs(30, seed=7)] + [{"prompt": t} for t in prose(30, 2)]
    return mdir, edir, write_jsonl(root / "traffic.jsonl", rows)


@pytest.mark.slow
def test_replay_store_list_ack(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _mdir, edir, log = setup
    db = str(tmp_path / "registry.db")
    policy = tmp_path / "monitor.toml"
    policy.write_text('[monitor]\nconsecutive = 1\n[actions]\nact = ["drift"]\naction = "rollback_canary"\n')
    proc = cli("replay", str(log), "--profile", str(edir), "--policy", str(policy), "--window", "10",
               "--ert", "400", "--store", "--registry", db, "--version", "tiny:1", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["requests"] == 60 and rep["incidents"]
    assert all(i["action_result"] == "not performed: dry run: would roll the canary back to 0%"
               for i in rep["incidents"])
    assert min(i["window"]["last_request"] for i in rep["incidents"]) > 30
    assert "every 400 requests" in rep["explain"]["tokens"]
    listed = json.loads(cli("incidents", "--registry", db, "--json").stdout)
    assert {i["id"] for i in listed} == {i["id"] for i in rep["incidents"]}
    assert listed[0]["digest"] and listed[0]["dataset_manifest_sha256"] == "ab" * 32
    first = listed[-1]["id"]
    ack = cli("ack", first[:8], "--by", "ops", "--registry", db, "--json")
    assert ack.returncode == 0 and json.loads(ack.stdout)["status"] == "acked"
    clean_failure(cli("ack", first, "--registry", db), "already acknowledged")
    st = json.loads(cli("status", "--registry", db, "--json").stdout)
    assert sum(r["count"] for r in st["rows"] if r["status"] == "acked") == 1
    assert len(st["open_incidents"]) == len(listed) - 1
    human = cli("replay", str(log), "--profile", str(edir), "--window", "10", "--ert", "400")
    assert human.returncode == 0 and "would have been opened" in human.stdout


def test_profile_from_traffic_and_explain(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    mdir, _, log = setup
    out = tmp_path / "traffic-profile"
    proc = cli("profile", str(log), "--model", str(mdir), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["requests"] == 60 and (out / "profile.safetensors").exists()
    ex = cli("explain", "--profile", str(out), "--json")
    assert ex.returncode == 0, ex.stderr
    text = json.loads(ex.stdout)
    assert {"tokens", "scalars", "hidden", "routing", "slo.max_error_rate"} <= set(text)
    assert "10,000 requests" in text["hidden"] and "Action on an incident: notify" in text["hidden"]


def test_bad_input(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _mdir, edir, log = setup
    clean_failure(cli("replay", str(log), "--profile", str(tmp_path)), "no profile.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": }\n')
    clean_failure(cli("replay", str(bad), "--profile", str(edir)), "bad.jsonl:2: malformed JSON")
    pol = tmp_path / "p.toml"
    pol.write_text("[monitor]\nwindow = 10\nert = 5\n")
    clean_failure(cli("replay", str(log), "--profile", str(edir), "--policy", str(pol)), "unknown key(s) ['ert']")
    clean_failure(cli("replay", str(log), "--profile", str(edir), "--window", "50", "--ert", "60"),
                  "must exceed window x consecutive")
    clean_failure(cli("replay", str(log), "--profile", str(edir), "--model", str(tmp_path / "nope")),
                  "model directory not found")
    clean_failure(cli("incidents", "--status", "closed", "--registry", str(tmp_path / "r.db")), "--status")
    clean_failure(cli("ack", "nope", "--registry", str(tmp_path / "r.db")), "no incident 'nope'")
    for cmd in ("replay", "profile", "explain", "status", "incidents", "ack"):
        h = cli(cmd, "--help")
        assert h.returncode == 0 and "Usage" in h.stdout
    # the real command line: one line on stderr, exit 2, no traceback
    clean_failure(run("replay", str(bad), "--profile", str(edir)), "bad.jsonl:2: malformed JSON")
    assert run("--help").returncode == 0
