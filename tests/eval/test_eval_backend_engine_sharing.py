"""The engine backend scores only what it is asked and computes a shared context once: the
numbers are those of the torch backend and of an engine that shares nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from trustmoe.engine import Engine
from trustmoe.eval.backend_engine import EngineLM, schedule_order
from trustmoe.eval.backend_model import ModelLM
from trustmoe.eval.lm import ContinuationRequest
from trustmoe.eval.loglik import STAT_NAMES, Request
from trustmoe.model.transformer import Transformer


def test_schedule_order_groups_requests_by_their_cached_context() -> None:
    ctx = list(range(3, 40))  # BOS + 37 tokens: two full blocks of 16 before the scored rows
    reqs = [Request([0, *ctx, 5], 38), Request([0, *ctx[:10], 6], 11),  # short: no full block
            Request([0, *ctx, 7, 8], 38), Request([0, *ctx[:20], 9], 21),
            Request([0, *ctx, 9], 38), Request([0, *ctx[:20], 4], 21)]
    first, followers = schedule_order(reqs, 16)
    assert list(first) == [0, 1, 3]
    assert followers == {0: [2, 4], 3: [5]}
    # every request is submitted exactly once
    assert sorted([*first, *(i for f in followers.values() for i in f)]) == list(range(6))


@pytest.fixture(scope="module")
def mc_requests() -> list[ContinuationRequest]:
    rng = random.Random(0)
    out = []
    for _ in range(6):  # items of one context and four choices, as lm-eval MC tasks
        ctx = [rng.randrange(3, 512) for _ in range(rng.randrange(20, 90))]
        for _ in range(4):
            out.append(ContinuationRequest(ctx, [rng.randrange(3, 512)
                                                 for _ in range(rng.randrange(1, 6))]))
    out.append(ContinuationRequest([7, 8], [9]))  # a lone request with no full block
    return out


def test_multiple_choice_shares_the_context_and_agrees(
        tiny_model: Transformer, mc_requests: list[ContinuationRequest]) -> None:
    shared = EngineLM(Engine(tiny_model, max_num_seqs=4, prefill_chunk=256))
    alone = EngineLM(Engine(tiny_model, max_num_seqs=4, prefill_chunk=256,
                            enable_prefix_caching=False))
    model = ModelLM(tiny_model, None, batch_size=3)
    a = shared.loglikelihood(mc_requests)
    st = shared.engine.stats()
    # the 18 other choices each found their context's full blocks in the cache
    expected = sum((len(r.context) + 1 - 1) // 16 for r in mc_requests[:-1:4]) * 3
    assert st.prefix_cache_hits >= expected > 0
    b = alone.loglikelihood(mc_requests)
    c = model.loglikelihood(mc_requests)  # packed: one pass per context
    assert alone.engine.stats().prefix_cache_hits == 0
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x.targets, y.targets)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(x.logprobs, z.logprobs, atol=1e-4, rtol=0)
        for name in STAT_NAMES:
            np.testing.assert_allclose(getattr(x, name), getattr(y, name), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(x.greedy, y.greedy)


def test_scored_rows_only_in_windows(tiny_model: Transformer) -> None:
    """Rolling windows score only their new tokens: the logits returned are those rows."""
    lm = EngineLM(Engine(tiny_model, max_num_seqs=4, prefill_chunk=256))
    doc = random.Random(1).choices(range(3, 512), k=300)
    [s] = lm.loglikelihood_rolling([doc], max_len=64, stride=24, logits=True)
    assert s.n == 300 and s.logits is not None and s.logits.shape == (300, 512)
    [m] = ModelLM(tiny_model, None, batch_size=4).loglikelihood_rolling(
        [doc], max_len=64, stride=24, logits=True)
    np.testing.assert_allclose(s.logprobs, m.logprobs, atol=1e-4, rtol=0)
    assert m.logits is not None
    np.testing.assert_allclose(s.logits.numpy(), m.logits.numpy(), atol=1e-4)
