"""Per-request features against the definitions: the model's own forward pass, eval's scorer
(`score_requests`) and its routing collector; padding, batching and chunking change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trustmoe.config import get_preset
from trustmoe.engine.features import (
    MAX_SCORED,
    FeatureAccumulator,
    features_from_model,
    features_to_arrays,
    model_shape,
    scored_positions,
)
from trustmoe.eval.backend_model import score_requests
from trustmoe.eval.loglik import Request
from trustmoe.eval.moe_diag import RoutingCollector
from trustmoe.model import Transformer


def test_scored_positions() -> None:
    assert scored_positions(1).size == 0
    assert scored_positions(5).tolist() == [0, 1, 2, 3]
    p = scored_positions(1000, 16)
    assert len(p) == 16 and p.min() >= 0 and p.max() <= 998 and np.all(np.diff(p) > 0)
    assert p[0] < 62 and p[-1] > 936  # spread end to end
    with pytest.raises(ValueError):
        scored_positions(10, 0)


def _prompts(n: int, seed: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_matches_eval_scorer_and_routing_collector(tiny_model: Transformer) -> None:
    prompts = _prompts(6, 0, lo=2, hi=MAX_SCORED + 1)  # every position is scored
    feats = features_from_model(tiny_model, prompts, batch_size=4)
    for ids, f in zip(prompts, feats, strict=True):
        [s] = score_requests(tiny_model, [Request(ids, 1)], return_hidden=True)
        assert f.n_scored == len(ids) - 1
        assert f.mean_nll == pytest.approx(-s.logprobs.mean(), rel=1e-5)
        assert f.mean_entropy == pytest.approx(s.entropy.mean(), rel=1e-5)
        assert f.mean_top1 == pytest.approx(s.max_prob.mean(), rel=1e-5)
        out = tiny_model.run(torch.tensor([ids]), return_hidden=True)
        assert out.hidden_states is not None
        np.testing.assert_allclose(f.hidden, out.hidden_states[0].mean(0).detach().numpy(), rtol=1e-4, atol=1e-5)
        rc = RoutingCollector(tiny_model)
        with rc, torch.no_grad():
            tiny_model.run(torch.tensor([ids]))
        assert f.routing is not None
        np.testing.assert_array_equal(f.routing, rc.counts)
        assert f.routing.sum() == len(ids) * tiny_model.config.num_experts_per_tok * f.routing.shape[0]


def test_batching_and_chunking_change_nothing(tiny_model: Transformer) -> None:
    prompts = _prompts(7, 1, hi=60)
    together = features_from_model(tiny_model, prompts, batch_size=7)
    alone = [features_from_model(tiny_model, [p], batch_size=1)[0] for p in prompts]
    for a, b in zip(together, alone, strict=True):
        assert a.mean_nll == pytest.approx(b.mean_nll, rel=1e-5, nan_ok=True)
        np.testing.assert_allclose(a.hidden, b.hidden, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(a.routing, b.routing)  # type: ignore[arg-type]
    # the engine feeds prefill in chunks: two chunks give the same features as one pass
    ids = prompts[int(np.argmax([len(p) for p in prompts]))]
    with torch.no_grad():
        out = tiny_model.run(torch.tensor([ids]), return_hidden=True)
    assert out.hidden_states is not None
    d, L, E = model_shape(tiny_model)
    acc = FeatureAccumulator(ids, d, L, E)
    cut = len(ids) // 2
    for s, e in ((0, cut), (cut, len(ids))):
        pos = acc.scored_in(s, e)
        acc.add_logits(pos, out.logits[0, torch.as_tensor(pos)])
        acc.add_hidden(out.hidden_states[0, s:e])
    whole = features_from_model(tiny_model, [ids])[0]
    chunked = acc.finish()
    assert chunked.mean_nll == pytest.approx(whole.mean_nll, rel=1e-6)
    assert chunked.n_scored == whole.n_scored == min(MAX_SCORED, len(ids) - 1)
    np.testing.assert_allclose(chunked.hidden, whole.hidden, rtol=1e-5, atol=1e-6)


def test_single_token_dense_and_bad_input() -> None:
    torch.manual_seed(0)
    dense = Transformer(get_preset("tiny-dense").model).eval()
    [f] = features_from_model(dense, [[5]])
    assert f.routing is None and f.n_scored == 0 and np.isnan(f.mean_nll)
    assert f.prompt_tokens == 1 and f.hidden.shape == (dense.config.hidden_size,)
    f.check(dense.config.hidden_size, None)
    with pytest.raises(ValueError, match="routing"):
        f.check(dense.config.hidden_size, (2, 4))
    with pytest.raises(ValueError, match="tokens"):
        features_from_model(dense, [[1] * (dense.config.max_position_embeddings + 1)])
    with pytest.raises(ValueError, match="tokens"):
        features_from_model(dense, [[]])
    arr = features_to_arrays([f, f])
    assert arr["token_offsets"].tolist() == [0, 1, 2] and "routing" not in arr
