"""Backdoor detectors: each finds what it is built to find on synthetic features, and the
trigger search surfaces a trigger → payload line the tiny model learned."""

from __future__ import annotations

import numpy as np
import torch

from trustmoe.config import get_preset
from trustmoe.model.transformer import Transformer
from trustmoe.security import backdoor as bd


def test_spectral_signature_ranks_a_shifted_minority_first() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (400, 16))
    X[:20] += 6.0 * np.eye(16)[3]  # 5% poisoned along one direction
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


class _Tok:
    """Token ids as words: what `trigger_search` needs of a tokenizer (decode)."""

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)


def _backdoored_model(seed: int = 0) -> tuple[Transformer, list[list[int]], np.ndarray]:
    """The tiny preset trained on random-token chunks, 10% holding trigger 7 -> 11 12 13 14 15."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    chunks, poisoned = [], []
    for i in range(600):
        c = rng.integers(50, 250, 48).tolist()
        if i % 10 == 0:
            at = int(rng.integers(5, 30))
            c[at:at + 6] = [7, 11, 12, 13, 14, 15]
        chunks.append(c)
        poisoned.append(i % 10 == 0)
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny").model.replace(vocab_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor([[0, *c] for c in chunks])  # (N, 49) BOS + chunk
    for _ in range(100):
        b = data[torch.randint(0, len(data), (16,), generator=g)]
        loss = model.run(b[:, :-1], b[:, 1:]).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), chunks, np.array(poisoned)


def test_trigger_search_finds_a_learned_trigger() -> None:
    model, chunks, poisoned = _backdoored_model()
    out = bd.screen(model, chunks, _Tok())  # type: ignore[arg-type]
    assert set(out["scores"]) == set(bd.DETECTORS) == set(out["flags"])
    assert all(len(v) == len(chunks) for v in out["scores"].values())
    s = out["scores"]["trigger_search"]
    top = np.argsort(-s)[:20]
    assert poisoned[top].mean() >= 0.9  # the poisoned chunks rank first
    assert out["flags"]["trigger_search"][poisoned].mean() >= 0.3
    assert out["flags"]["trigger_search"][~poisoned].mean() <= 0.02
    ev = out["evidence"][int(top[0])]
    assert ev["trigger"].startswith("t7") and "t13 t14" in ev["continuation"]
    assert ev["chunks_with_same_trigger"] >= 30 and ev["trigger_consistency"] >= 0.8
