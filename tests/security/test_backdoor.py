"""Backdoor detectors: each finds what it is built to find on synthetic features, the
conformal calibration keeps false positives at the target rate, and on a tiny model that
learned a trigger → payload pair the trigger search flags the poisoned chunks and no clean
one, and nothing on the same model trained without the plant."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
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


def test_fit_rows_only_define_the_direction() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(0, 1, (300, 8))
    X[:, 0] *= 5.0  # the top direction is axis 0
    extra = np.zeros((2, 8))
    extra[0, 0], extra[1, 1] = 10.0, 10.0
    s = bd.spectral_scores(np.concatenate([X, extra]), n_fit=300)
    assert np.allclose(s[:300], bd.spectral_scores(X))  # the extra rows do not move the fit
    assert s[300] > 50 and s[301] < 5  # scored along the fitted direction only


def test_conformal_flags_keep_the_false_positive_rate() -> None:
    rng = np.random.default_rng(3)
    heavy = rng.standard_t(2, (200, 2000)) ** 2  # heavy-tailed, like spectral scores
    shares = [np.mean(bd.conformal_p(heavy[i, :1000], heavy[i, 1000:]) <= 0.01)
              for i in range(200)]
    assert np.mean(shares) <= 0.0105  # the guarantee: E[flagged share] <= alpha
    z_share = np.mean(bd.robust_z(heavy[0]) > 3.5)
    assert z_share > 0.05  # what a robust z-score threshold does on such scores
    p = bd.conformal_p(np.array([0.0, 1e9]), np.arange(99.0))
    assert p[0] == 1.0 and p[1] == pytest.approx(0.01)
    assert bd.self_p(np.arange(100.0))[-1] == pytest.approx(0.01)
    rng = np.random.default_rng(3)  # the reported bar is exactly where p crosses fpr
    for m, fpr in ((240, 0.01), (99, 0.01), (500, 0.05)):
        null = rng.integers(0, 20, m).astype(float)  # ties, as zeros are in a real null
        s = np.arange(0.0, 21.0, 0.5)
        assert ((bd.conformal_p(s, null) <= fpr) == (s > bd._to_beat(null, fpr))).all()
    assert bd._to_beat(np.zeros(50), 0.01) is None  # 50 null scores cannot give p <= 1%


class _Tok:
    """Token ids as words, each with a leading space (a word start): what `trigger_search`
    needs of a tokenizer (decode, and encode_batch with character offsets)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)

    def encode_batch(self, texts: list[str]) -> list[SimpleNamespace]:
        found = [list(re.finditer(r" t(\d+)", t)) for t in texts]
        return [SimpleNamespace(ids=[int(m.group(1)) for m in f],
                                offsets=[(m.start(), m.end()) for m in f]) for f in found]


def _backdoored_model(seed: int = 0, plant: bool = True
                      ) -> tuple[Transformer, list[list[int]], np.ndarray]:
    """The tiny preset trained on random-token chunks, 10% holding trigger 7 -> 11 12 13 14 15
    (with `plant`; otherwise the same chunks without it: the clean twin)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    chunks, poisoned = [], []
    for i in range(600):
        c = rng.integers(50, 250, 48).tolist()
        if plant and i % 10 == 0:
            at = int(rng.integers(5, 30))
            c[at:at + 6] = [7, 11, 12, 13, 14, 15]
        chunks.append(c)
        poisoned.append(plant and i % 10 == 0)
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


def test_trigger_search_flags_a_learned_backdoor_and_not_its_clean_twin() -> None:
    from trustmoe.security.privacy import greedy_continue

    model, chunks, poisoned = _backdoored_model()
    rng = np.random.default_rng(5)
    # the model learned the plant: trigger 7 -> payload 11..15, and nothing without it
    ctx = [[0, *rng.integers(50, 250, 12).tolist()] for _ in range(40)]
    with_t = greedy_continue(model, [[*c, 7] for c in ctx], 5)
    without = greedy_continue(model, ctx, 5)
    assert np.mean([g == [11, 12, 13, 14, 15] for g in with_t]) >= 0.8
    assert np.mean([g[:2] == [11, 12] for g in without]) <= 0.05
    null = [rng.integers(50, 250, 48).tolist() for _ in range(120)]  # held-out, clean
    chunks, poisoned = chunks[:300], poisoned[:300]  # 30 poisoned: enough, and quick
    out = bd.screen(model, chunks, _Tok(), null_chunks=null)  # type: ignore[arg-type]
    assert set(out["scores"]) == set(bd.DETECTORS) == set(out["flags"]) == set(out["p"])
    assert all(len(v) == len(chunks) for v in out["scores"].values())
    to_beat = out["null"].pop("trigger_search_to_beat")
    assert out["null"] == {"chunks": 120, "fpr": 0.01, "source": "held-out", "min_p": 0.008264,
                           "representation_detectors": "out of fold"}
    flags = out["flags"]["trigger_search"]
    trig = out["scores"]["trigger_search"]  # what is flagged is exactly what clears the bar
    assert to_beat is not None and (flags == (trig > to_beat)).all()
    assert flags[poisoned].mean() >= 0.9  # the poisoned chunks are found...
    assert flags[~poisoned].mean() <= 0.01  # ...and clean training chunks are not
    for d in bd.DETECTORS[:3]:  # the classic detectors, out of fold: <= 1%, whatever they find
        assert out["flags"][d].mean() <= 0.01, d
    ev = out["evidence"][int(np.argmax(out["scores"]["trigger_search"]))]
    assert ev["trigger"].endswith("t7") and ev["continuation"].startswith(" t11 t12 t13 t14 t15")
    assert ev["chunks_with_same_trigger"] >= 25 and ev["trigger_consistency"] >= 0.8
    assert ev["delta_nll"] > 10 and ev["nll_with_trigger"] < ev["nll_without_trigger"] - 10
    # the clean twin (same chunks, no plant, trained alike): nothing flagged
    twin, clean_chunks, _ = _backdoored_model(plant=False)
    out = bd.screen(twin, clean_chunks[:300], _Tok(), null_chunks=null)  # type: ignore[arg-type]
    assert out["flags"]["trigger_search"].mean() <= 0.01
