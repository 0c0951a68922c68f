"""The engine backend measures what is served: fp32 equals the torch model, int8/int4 differ a
little and are measured, not assumed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from trustmoe.eval.backend_engine import EngineLM
from trustmoe.eval.backend_model import ModelLM
from trustmoe.eval.lm import ContinuationRequest, GenerateRequest
from trustmoe.eval.loglik import STAT_NAMES, Scored


def ppl(scored: list[Scored]) -> float:
    return math.exp(-sum(s.total for s in scored) / sum(s.n for s in scored))


@pytest.fixture(scope="module")
def docs(enc, corpus_docs) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [enc(t) for t in corpus_docs["val"][:8]]


@pytest.fixture(scope="module")
def engine_lm(model_dir: Path) -> EngineLM:
    return EngineLM.from_dir(model_dir, batch_size=4)


@pytest.fixture(scope="module")
def model_lm(model_dir: Path) -> ModelLM:
    return ModelLM.create(model_dir, batch_size=3)


def test_fp32_engine_equals_model_on_every_summary(engine_lm: EngineLM, model_lm: ModelLM,
                                                   docs: list[list[int]]) -> None:
    assert engine_lm.prefix_id == model_lm.prefix_id == 0  # the config's BOS, not a constant
    a = model_lm.loglikelihood_rolling(docs, max_len=48, stride=16, logits=True)
    b = engine_lm.loglikelihood_rolling(docs, max_len=48, stride=16, logits=True)
    assert abs(ppl(b) / ppl(a) - 1) < 1e-4
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.targets, y.targets)
        np.testing.assert_allclose(y.logprobs, x.logprobs, atol=1e-4, rtol=0)
        for name in STAT_NAMES:
            np.testing.assert_allclose(getattr(y, name), getattr(x, name), atol=1e-4, rtol=1e-5)
        np.testing.assert_array_equal(x.greedy, y.greedy)
        assert x.logits is not None and y.logits is not None
        np.testing.assert_allclose(y.logits.numpy(), x.logits.numpy(), atol=1e-4)
    # the engine exposes no hidden states: asked for, it leaves them out
    assert all(s.hidden is None for s in engine_lm.loglikelihood_rolling(docs[:2], hidden=True))
    assert "hidden" in engine_lm.caps.limits() and "hidden" not in model_lm.caps.limits()


def test_continuations_and_generation_agree(engine_lm: EngineLM, model_lm: ModelLM,
                                            docs: list[list[int]]) -> None:
    reqs = [ContinuationRequest(d[:10], d[10:14]) for d in docs] + \
        [ContinuationRequest(docs[0][:10], c) for c in ([5], [7, 8], docs[1][:3])]
    a = [s.total for s in model_lm.loglikelihood(reqs)]  # packed shared contexts
    b = [s.total for s in engine_lm.loglikelihood(reqs)]
    np.testing.assert_allclose(b, a, atol=1e-4)
    gens = [GenerateRequest(d[:12], 6) for d in docs[:3]]
    ga, gb = model_lm.generate_until(gens), engine_lm.generate_until(gens)
    assert [g.text for g in ga] == [g.text for g in gb]
    assert all(len(g.token_ids) <= 6 for g in gb)


def test_quantized_engines_are_measured(model_dir: Path, engine_lm: EngineLM,
                                        docs: list[list[int]]) -> None:
    base = ppl(engine_lm.loglikelihood_rolling(docs))
    for mode, tol in (("int8", 0.02), ("int4", 0.10)):
        q = EngineLM.from_dir(model_dir, quantize=mode, batch_size=4)
        assert q.quantize == mode and q.describe()["quantize"] == mode
        got = ppl(q.loglikelihood_rolling(docs))
        assert got != base  # other weights, other numbers
        assert abs(got / base - 1) < tol, (mode, got, base)
