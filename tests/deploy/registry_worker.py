"""A separate process that works on a registry, for the concurrency tests.

    python registry_worker.py race URL BLOBS NAME VERSION ALIAS READY GO
        read the alias's newest entry, touch READY, wait for GO, promote against that entry
    python registry_worker.py storm URL BLOBS NAME ALIAS N SEED
        N promotions of random versions; prints one line per outcome
    python registry_worker.py add URL BLOBS NAME MODEL_DIR...
        add each model dir; prints the version numbers
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from trustmoe.deploy.db import ConflictError
from trustmoe.deploy.gates import parse_policy
from trustmoe.deploy.registry import Registry

OPEN = parse_policy('[gates.ece]\nmax = 1e9\nmissing = "skip"\n', "worker: open")


def main(argv: list[str]) -> None:
    cmd, url, blobs = argv[0], argv[1], Path(argv[2])
    reg = Registry.open(url, blobs=blobs)
    if cmd == "race":
        name, version, alias, ready, go = argv[3], int(argv[4]), argv[5], Path(argv[6]), Path(argv[7])
        ev = reg.alias_holder(name, alias)
        seq = ev.seq if ev else 0
        ready.touch()
        deadline = time.time() + 60
        while not go.exists() and time.time() < deadline:
            time.sleep(0.001)
        try:
            res = reg.promote(name, version, alias, policy=OPEN, expected_seq=seq, why="race")
            print(json.dumps({"outcome": "won" if res.changed else "same", "seq": res.event.seq}))
        except ConflictError as e:
            print(json.dumps({"outcome": "conflict", "message": str(e)}))
    elif cmd == "storm":
        name, alias, n, seed = argv[3], argv[4], int(argv[5]), int(argv[6])
        rng = random.Random(seed)
        versions = [v.version for v in reg.versions(name)]
        for _ in range(n):
            try:
                res = reg.promote(name, rng.choice(versions), alias, policy=OPEN, why="storm")
                print(json.dumps({"outcome": "won" if res.changed else "same", "seq": res.event.seq}))
            except ConflictError:
                print(json.dumps({"outcome": "conflict"}))
    elif cmd == "add":
        name = argv[3]
        for d in argv[4:]:
            print(json.dumps({"version": reg.add(Path(d), name).version}))
    else:
        raise SystemExit(f"unknown command {cmd}")
    reg.close()


if __name__ == "__main__":
    main(sys.argv[1:])
