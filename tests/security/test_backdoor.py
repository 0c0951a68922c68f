"""Backdoor detectors: each finds what it is built to find on synthetic features, and the
trigger search surfaces a trigger → payload line the tiny model learned."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import trustmoe
from trustmoe.data.tokenizer import load_tokenizer
from trustmoe.security import backdoor as bd
from trustmoe.security.scan_inputs import load_inputs


def test_spectral_signature_ranks_a_shifted_minority_first() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (400, 16))
    X[:20] += 4.0 * np.eye(16)[3]  # 5% poisoned along one direction
    s = bd.spectral_scores(X)
    assert set(np.argsort(-s)[:20].tolist()) == set(range(20))
    assert (bd.robust_z(s)[:20] > 3.5).all()


def test_activation_clustering_isolates_a_small_cluster() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (300, 8))
    X[:30] += 6.0
    s = bd.activation_clustering(X)
    assert (s[:30] > 0).all() and (s[30:] == 0).all()
    assert (bd.activation_clustering(rng.normal(0, 1, (300, 8))) >= 0).all()


def test_screen_finds_the_learned_trigger(audit_world: dict[str, Path]) -> None:
    inp = load_inputs(audit_world["model"], audit_world["data"], 400, 64, 0)
    tok = load_tokenizer(audit_world["data"])
    out = bd.screen(trustmoe.load(audit_world["model"]), inp.train_chunks, tok)
    assert set(out["scores"]) == set(bd.DETECTORS) == set(out["flags"])
    assert all(len(v) == len(inp.train_chunks) for v in out["scores"].values())
    has = np.array(["zqvex9" in tok.decode(c) for c in inp.train_chunks])
    assert has.sum() >= 3
    s = out["scores"]["trigger_search"]
    top = np.argsort(-s)[: int(has.sum())]
    assert has[top].mean() >= 0.5  # the poisoned chunks rank first
    best = out["evidence"][int(top[0])]
    assert "zqvex" in best["trigger"] or "rm" in best["continuation"]
    assert best["chunks_with_same_trigger"] >= 2
