"""Real processes on both backends: racing promotions, concurrent adds, and `kill -9` in the
middle of `add` and of a promotion. The registry must always show the last good state."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from registry_helpers import Backend, cli_env, make_model, open_policy

from trustmoe.deploy.registry import FAULT_ENV, Registry
from trustmoe.io import sha256_file

WORKER = str(Path(__file__).with_name("registry_worker.py"))
OPEN = open_policy()


def _worker(b: Backend, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, WORKER, args[0], b.url, str(b.blobs), *args[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(p: subprocess.Popen[str], timeout: float = 120) -> list[dict[str, object]]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _seed(b: Backend, tmp_path: Path, n: int) -> Registry:
    reg = b.open()
    for i in range(1, n + 1):
        reg.add(make_model(tmp_path / f"m{i}", seed=i), "demo")
    return reg


def test_two_promoters_at_once_one_wins_one_conflicts(backend: Backend, tmp_path: Path) -> None:
    reg = _seed(backend, tmp_path, 5)
    reg.promote("demo", 1, "production", policy=OPEN)
    for rnd in range(2):  # twice: v2 vs v3, then v4 vs v5
        go = tmp_path / f"go{rnd}"
        ready = [tmp_path / f"ready{rnd}-{i}" for i in range(2)]
        procs = [_worker(backend, "race", "demo", str(2 + 2 * rnd + i), "production", str(ready[i]), str(go))
                 for i in range(2)]
        deadline = time.time() + 60
        while not all(r.exists() for r in ready) and time.time() < deadline:
            time.sleep(0.01)
        go.touch()
        results = [_lines(p)[0] for p in procs]
        outcomes = sorted(str(r["outcome"]) for r in results)
        assert outcomes == ["conflict", "won"], results
        loser = next(r for r in results if r["outcome"] == "conflict")
        assert "moved by another writer" in str(loser["message"])
    hist = reg.history("demo", "production")
    assert [e.seq for e in hist] == [1, 2, 3]  # one entry per round, no duplicate, no gap
    assert reg.verify().ok


def test_promotion_storm_keeps_history_consistent(backend: Backend, tmp_path: Path) -> None:
    reg = _seed(backend, tmp_path, 4)
    procs = [_worker(backend, "storm", "demo", "production", "15", str(seed)) for seed in (1, 2)]
    outcomes = [o for p in procs for o in _lines(p)]
    won = [o for o in outcomes if o["outcome"] == "won"]
    assert len(outcomes) == 30 and all(o["outcome"] in ("won", "same", "conflict") for o in outcomes)
    hist = reg.history("demo", "production")
    assert [e.seq for e in hist] == list(range(1, len(hist) + 1))
    assert sorted(int(str(o["seq"])) for o in won) == [e.seq for e in hist]  # every win is there
    assert all(a.version != b.version for a, b in itertools.pairwise(hist))
    rep = reg.verify()
    assert rep.ok, rep.problems


def test_concurrent_adds_get_distinct_versions(backend: Backend, tmp_path: Path) -> None:
    dirs = [make_model(tmp_path / f"m{i}", seed=i) for i in range(6)]
    # both workers open a registry that does not exist yet: they race to create the schema,
    # the registry id, the blob store and the model's row too
    procs = [_worker(backend, "add", "demo", *map(str, dirs[i::2])) for i in range(2)]
    versions = sorted(int(str(o["version"])) for p in procs for o in _lines(p))
    assert versions == [1, 2, 3, 4, 5, 6]
    reg = backend.open()
    assert {v.digest for v in reg.versions("demo")} == {
        reg.resolve(f"demo@{n}").digest for n in range(1, 7)}


def _add_cli(b: Backend, model: Path, fault: str | None) -> subprocess.Popen[str]:
    env = cli_env(b.url, b.blobs)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "trustmoe.cli", "registry", "add", str(model),
                             "--name", "demo", "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_at_fault(p: subprocess.Popen[str], point: str) -> None:
    assert p.stderr is not None
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stderr.readline()
        if f"FAULT {point}" in line:
            break
        assert line or p.poll() is None, f"worker ended before {point}"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    assert p.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", ["add:blobs-written", "add:before-commit"])
def test_kill_9_during_add_leaves_last_good_state(backend: Backend, tmp_path: Path,
                                                  point: str) -> None:
    reg = _seed(backend, tmp_path, 1)
    reg.promote("demo", 1, "production", policy=OPEN)
    new = make_model(tmp_path / "new", seed=7, size=4096)
    _kill_at_fault(_add_cli(backend, new, point), point)
    reg2 = backend.open()  # a fresh connection after the crash
    assert [v.version for v in reg2.versions("demo")] == [1]  # no half-version
    assert reg2.resolve("demo@production").version == 1
    assert reg2.verify().ok
    kept = {e.sha256 for e in reg2.files("demo", 1)}
    orphans = {sha256_file(f) for f in new.iterdir()} - kept
    assert orphans and orphans <= set(reg2.store.all_blobs())  # blobs were written, then the kill
    gc = reg2.gc(grace_s=0)  # the crashed add's own blobs are orphans; shared files are kept
    assert gc.blobs_removed == len(orphans) and set(reg2.store.all_blobs()) == kept
    assert reg2.verify().ok
    again = reg2.add(new, "demo")
    assert again.version == 2 and reg2.resolve("demo@2").path.is_dir()


def test_kill_9_during_promotion_changes_nothing(backend: Backend, tmp_path: Path) -> None:
    reg = _seed(backend, tmp_path, 2)
    reg.promote("demo", 1, "production", policy=OPEN)
    env = cli_env(backend.url, backend.blobs)
    env[FAULT_ENV] = "alias:before-commit"
    gates = tmp_path / "gates.toml"
    gates.write_text('[gates.ece]\nmax = 1\nmissing = "skip"\n')
    p = subprocess.Popen([sys.executable, "-m", "trustmoe.cli", "registry", "promote", "demo", "2",
                          "--alias", "production", "--gates", str(gates)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_at_fault(p, "alias:before-commit")
    reg2 = backend.open()
    assert [(e.seq, e.version) for e in reg2.history("demo", "production")] == [(1, 1)]
    assert reg2.promote("demo", 2, "production", policy=OPEN).event.seq == 2  # not blocked


@pytest.mark.slow
def test_kill_9_at_random_moments_of_add(backend: Backend, tmp_path: Path) -> None:
    _seed(backend, tmp_path, 1)
    rng = random.Random(0)
    for i in range(4):
        model = make_model(tmp_path / f"big{i}", seed=10 + i, size=200_000)  # ~3 MB of weights
        p = _add_cli(backend, model, None)
        time.sleep(rng.uniform(0.3, 2.5))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(60)
        reg2 = backend.open()
        versions = [v.version for v in reg2.versions("demo")]
        assert versions == list(range(1, len(versions) + 1))
        rep = reg2.verify()
        assert rep.ok, rep.problems  # whatever was committed is complete
        reg2.close()
