"""`trustmoe registry` as a user meets it (real subprocesses): the whole flow on both backends,
and every kind of bad input — one clear line, non-zero exit, nothing stored changed."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import Backend, assert_clean_failure, cli_env, make_eval, make_model, run_cli
from typer.testing import CliRunner

from trustmoe.cli import app
from trustmoe.cli.registry import registry_app

COMMANDS = ["add", "list", "show", "path", "promote", "rollback", "history", "verify", "gc", "gates"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd: str) -> None:
    res = CliRunner().invoke(app, ["registry", cmd, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output
    if cmd not in ("add", "promote", "rollback", "gc", "gates"):
        assert "--json" in res.output  # every reading command can speak JSON
    assert {c.name for c in registry_app.registered_commands} == set(COMMANDS)


def main(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`trustmoe registry ARGS` through the real entry point (`trustmoe.cli.main`, which turns
    errors into one line and exit 2), in-process with stdout/stderr captured."""
    import contextlib
    import io
    from unittest import mock

    from trustmoe.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.dict(os.environ, env, clear=True), \
            mock.patch.object(sys, "argv", ["trustmoe", "registry", *args]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["trustmoe", "registry", *args], code, out.getvalue(),
                                       err.getvalue())


class Cli:
    """The registry CLI in-process (fast); the subprocess tests below cover exit codes and
    one-line errors as `main()` prints them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, ok: bool = True) -> Any:
        res = CliRunner().invoke(app, ["registry", *args], env=self.env)
        if ok:
            assert res.exit_code == 0, (res.output, res.exception)
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)


def test_cli_flow(backend: Backend, tmp_path: Path) -> None:
    from trustmoe.deploy.aliases import GateRefusal
    from trustmoe.deploy.db import RegistryError

    cli = Cli(cli_env(backend.url, backend.blobs))
    m1, m2, m3 = (make_model(tmp_path / f"m{i}", seed=i) for i in (1, 2, 3))
    e1 = make_eval(tmp_path / "e1", model=m1, perplexity=10.0, ece=0.05)
    e2 = make_eval(tmp_path / "e2", model=m2, perplexity=10.1, ece=0.04)
    e3 = make_eval(tmp_path / "e3", model=m3, perplexity=11.0, ece=0.04)
    out = cli("add", str(m1), "--name", "demo", "--eval", str(e1), "--why", "baseline")
    assert out.stdout.startswith("demo v1  sha256:")
    cli("add", str(m2), "--name", "demo", "--eval", str(e2))
    assert cli.json("add", str(m3), "--name", "demo", "--eval", str(e3))["version"] == 3
    cli("promote", "demo", "1", "--alias", "production")
    ok = cli.json("promote", "demo", "2", "--alias", "production", "--why", "better")
    assert ok["event"]["seq"] == 2
    refused = cli("promote", "demo", "3", "--alias", "production", ok=False)
    assert isinstance(refused.exception, GateRefusal)
    assert "perplexity: 11 > 1.02 x holder v2 (10.1) = 10.302" in str(refused.exception)
    nowhy = cli("promote", "demo", "3", "--alias", "production", "--force", ok=False)
    assert isinstance(nowhy.exception, RegistryError) and "--force needs --why" in str(nowhy.exception)
    ev = cli.json("promote", "demo", "3", "--alias", "production", "--force", "--why",
                  "hotfix for customer X")["event"]
    assert ev["forced"] and ev["gates"]["overridden"] and ev["why"] == "hotfix for customer X"
    failed = [r for r in ev["gates"]["report"]["results"] if r["status"] == "fail"]
    assert [(r["name"], r["value"], r["holder_value"]) for r in failed] == [("perplexity", 11.0, 10.1)]
    back = cli.json("rollback", "demo", "--alias", "production", "--why", "regression")
    assert back["event"]["version"] == 2
    hist = cli.json("history", "demo")
    assert [(e["seq"], e["action"], e["version"], e["forced"]) for e in hist["events"]] == [
        (1, "promote", 1, False), (2, "promote", 2, False), (3, "promote", 3, True),
        (4, "rollback", 2, False)]
    assert [v["version"] for v in hist["versions"]] == [1, 2, 3]
    t_first = hist["events"][0]["at"]
    shown = cli.json("show", "demo@production", "--at", t_first)
    assert shown["version"] == 1 and shown["alias_event"]["seq"] == 1
    now = cli.json("show", "registry:demo@production")
    assert now["version"] == 2 and now["aliases"] == ["production"]
    assert now["metadata"]["dataset_manifest_sha256"] == "ab" * 32
    found = cli.json("list", "--alias", "production")
    assert [(v["name"], v["version"]) for v in found] == [("demo", 2)]
    models = cli.json("list")
    assert models[0]["aliases"] == {"production": 2} and models[0]["versions"] == 3
    assert [v["version"] for v in cli.json("list", "demo", "--dataset", "abab")] == [1, 2, 3]
    path = cli.json("path", "demo@production")
    assert Path(path["path"], "model.safetensors").read_bytes() == (m2 / "model.safetensors").read_bytes()
    assert Path(path["eval_path"], "eval.json").is_file()
    assert cli.json("verify")["blobs_checked"] > 0
    human = cli("history", "demo").stdout
    assert "rollback" in human and "regression" in human and "hotfix for customer X" in human
    assert "production" in cli("show", "demo@production").stdout
    assert "demo" in cli("list").stdout
    cli("gc", "--grace-minutes", "0")
    cli("verify")


def _snapshot(db: Path, blobs: Path) -> tuple[str, list[tuple[str, str]]]:
    """Everything stored: a full SQL dump of the database and every blob-store file's hash."""
    con = sqlite3.connect(db)
    dump = "\n".join(con.iterdump())
    con.close()
    files = sorted((str(p.relative_to(blobs)), hashlib.sha256(p.read_bytes()).hexdigest())
                   for p in blobs.rglob("*") if p.is_file())
    return dump, files


@pytest.fixture
def stocked(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    db, blobs = tmp_path / "r.db", tmp_path / "blobs"
    env = cli_env(str(db), blobs)
    m = make_model(tmp_path / "m1", seed=1)
    assert main(env, "add", str(m), "--name", "demo", "--eval",
                   str(make_eval(tmp_path / "e1", model=m))).returncode == 0
    assert main(env, "promote", "demo", "1", "--alias", "production").returncode == 0
    return env, db, blobs


def test_bad_input_is_one_line_and_changes_nothing(stocked: tuple[dict[str, str], Path, Path],
                                                   tmp_path: Path) -> None:
    env, db, blobs = stocked
    before = _snapshot(db, blobs)
    pickled = make_model(tmp_path / "pk", seed=5, extra={"pytorch_model.bin": b"\x80\x04K\x01."})
    bad_gates = tmp_path / "bad-gates.toml"
    bad_gates.write_text("[gates.perplexity\nmax_ratio_to_holder = 1.02\n")
    m2 = make_model(tmp_path / "m2", seed=2)
    strict = tmp_path / "strict.toml"
    strict.write_text("[gates.ece]\nmax = 0.01\n")
    cases = [
        (["show", "nosuch"], "unknown model 'nosuch'"),
        (["show", "demo@9"], "unknown version demo@9"),
        (["show", "demo@canary"], "points at no version"),
        (["show", "demo@Bad!"], "invalid alias"),
        (["show", "demo@production", "--at", "yesterday"], "not an ISO 8601 time"),
        (["promote", "demo", "7", "--alias", "production"], "unknown version demo@7"),
        (["promote", "nosuch", "1", "--alias", "production"], "unknown model"),
        (["rollback", "demo", "--alias", "production"], "no earlier holder"),
        (["rollback", "demo", "--alias", "canary"], "has no history"),
        (["history", "nosuch"], "unknown model"),
        (["promote", "demo", "1", "--alias", "canary", "--gates", str(bad_gates)], "not valid TOML"),
        (["promote", "demo", "1", "--alias", "canary", "--gates", str(tmp_path / "no.toml")],
         "gates file not found"),
        (["add", str(pickled), "--name", "demo"], "pytorch_model.bin is a pickle weights file"),
        (["add", str(tmp_path / "missing"), "--name", "demo"], "model directory not found"),
        (["add", str(m2), "--name", "bad name"], "invalid model name"),
        (["add", str(m2), "--name", "demo", "--eval", str(tmp_path / "m1")], "not an eval dir"),
        (["promote", "demo", "1", "--alias", "canary", "--gates", str(strict)],
         "refused: 1 gate failed"),
    ]
    for args, needle in cases:
        proc = main(env, *args)
        assert_clean_failure(proc, needle)
        assert proc.returncode == 2, proc.stderr
        if "refused" in needle:  # every failed gate on its own line, with both values
            assert "ece: 0.05 > 0.01" in proc.stderr and "--force --why" in proc.stderr
        else:
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _snapshot(db, blobs) == before


def test_missing_or_changed_blob_is_refused_by_name(stocked: tuple[dict[str, str], Path, Path]
                                                    ) -> None:
    env, db, blobs = stocked
    shown = json.loads(main(env, "show", "demo@1", "--json").stdout)
    weights = next(f for f in shown["files"]["model"] if f["path"] == "model.safetensors")
    blob = blobs / "sha256" / weights["sha256"][:2] / weights["sha256"]
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = _snapshot(db, blobs)
    assert_clean_failure(main(env, "path", "demo@production"),
                         "file model.safetensors (blob")
    ver = main(env, "verify")
    assert ver.returncode == 1 and "model.safetensors" in ver.stderr and "has changed" in ver.stderr
    blob.unlink()
    assert_clean_failure(main(env, "path", "demo@1"), "is missing from the blob store")
    assert _snapshot(db, blobs)[0] == before[0]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "directory", "foreign"])
def test_unreadable_or_corrupt_database(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "r.db"
    if kind == "garbage":
        db.write_bytes(b"this is not a database at all" * 100)
    elif kind == "truncated":
        env = cli_env(str(db), tmp_path / "blobs")
        assert main(env, "add", str(make_model(tmp_path / "m")), "--name", "demo").returncode == 0
        con = sqlite3.connect(db)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        raw = db.read_bytes()
        db.write_bytes(raw[:100] + b"\xff" * (len(raw) - 100))  # header kept, pages destroyed
    elif kind == "directory":
        db.mkdir()
    else:
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        con.commit()
        con.close()
    before = db.read_bytes() if db.is_file() else None
    env = cli_env(str(db), tmp_path / "blobs2")
    needle = {"garbage": "unreadable or corrupt", "truncated": "unreadable or corrupt",
              "directory": "is a directory", "foreign": "not a trustmoe registry"}[kind]
    for args in (["list"], ["add", str(make_model(tmp_path / "m9", seed=9)), "--name", "x"]):
        proc = main(env, *args)
        assert_clean_failure(proc, needle)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (db.read_bytes() if db.is_file() else None) == before
    assert not (tmp_path / "blobs2").exists() or not any((tmp_path / "blobs2").rglob("*"))


def test_missing_registry_and_unreachable_postgres(tmp_path: Path) -> None:
    env = cli_env(str(tmp_path / "none.db"), tmp_path / "b")
    assert_clean_failure(run_cli(env, "list"), "no registry at")
    assert not (tmp_path / "none.db").exists()  # reading never creates one
    env = cli_env("postgresql://nobody@/nodb?host=/nonexistent-dir&port=1", tmp_path / "b")
    assert_clean_failure(run_cli(env, "list"), "cannot connect to registry database")


def test_gates_file_beside_registry_is_used(stocked: tuple[dict[str, str], Path, Path],
                                           tmp_path: Path) -> None:
    env, db, _blobs = stocked
    (db.parent / "gates.toml").write_text("[gates.ece]\nmax = 0.001\n")
    shown = main(env, "gates", "--json")
    assert json.loads(shown.stdout)["source"] == str(db.parent / "gates.toml")
    dry = main(env, "promote", "demo", "1", "--alias", "canary", "--dry-run")
    assert dry.returncode == 1 and "FAIL ece: 0.05 > 0.001" in dry.stdout


def test_demo_registration(tmp_path: Path) -> None:
    from rich.console import Console

    from trustmoe.cli.registry import register_demo
    from trustmoe.deploy.registry import Registry

    m = make_model(tmp_path / "model")
    e = make_eval(tmp_path / "eval", model=m)
    con = Console(record=True, width=200)
    register_demo(tmp_path, m, e, tmp_path / "data", con)
    text = con.export_text()
    assert "registry: demo v1" in text and "-> production" in text
    reg = Registry.open(tmp_path / "registry.db", create=False)
    assert reg.resolve("registry:demo@production").version == 1
    m2 = make_model(tmp_path / "model", seed=2)  # a second demo run, worse model
    register_demo(tmp_path, m2, make_eval(tmp_path / "eval", model=m2, perplexity=99.0), None, con)
    assert "not promoted" in con.export_text() and reg.get("demo@production").version == 1
