"""The OpenAI backend against our own server over real HTTP: exact log-probabilities agree with
the engine backend; the distribution summaries are estimates, labelled so."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trustmoe.eval.backend_engine import EngineLM
from trustmoe.eval.backend_openai import OpenAILM
from trustmoe.eval.lm import ContinuationRequest, GenerateRequest, open_lm
from trustmoe.eval.loglik import Scored
from trustmoe.io import TrustmoeError


def ppl(scored: list[Scored]) -> float:
    return math.exp(-sum(s.total for s in scored) / sum(s.n for s in scored))


@pytest.fixture(scope="module")
def docs(enc, corpus_docs) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [enc(t) for t in corpus_docs["val"][:6]]


@pytest.fixture(scope="module")
def remote(served, model_dir: Path):  # type: ignore[no-untyped-def]
    with OpenAILM.connect(served.url, model_dir, top_logprobs=20, batch_size=4) as lm:
        yield lm


@pytest.fixture(scope="module")
def local(model_dir: Path) -> EngineLM:
    return EngineLM.from_dir(model_dir, batch_size=4)


def test_perplexity_and_exact_fields_agree_with_engine(remote: OpenAILM, local: EngineLM,
                                                       docs: list[list[int]],
                                                       model_dir: Path) -> None:
    # the served model's name and context come from /v1/models
    assert remote.model == model_dir.name and remote.max_length == local.max_length
    assert remote.prefix_id == local.prefix_id
    a = local.loglikelihood_rolling(docs, max_len=40, stride=13)
    b = remote.loglikelihood_rolling(docs, max_len=40, stride=13, logits=True)
    assert abs(ppl(b) / ppl(a) - 1) < 1e-4
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.targets, y.targets)
        np.testing.assert_allclose(y.logprobs, x.logprobs, atol=1e-5)
        np.testing.assert_array_equal(y.greedy, x.greedy)  # top-1 is listed: exact
        np.testing.assert_allclose(y.max_prob, x.max_prob, atol=1e-5)
        # estimates from the top 20 of 512: close for entropy on this near-uniform model
        np.testing.assert_allclose(y.entropy, x.entropy, rtol=0.02)
        assert np.isnan(y.lse).all() and np.isnan(y.max_logit).all()
        assert y.logits is not None and y.logits.shape == (y.n, 512)
        lp = y.logits.double().log_softmax(-1)  # pseudo logits hold the estimated distribution
        tgt = lp.gather(1, torch.from_numpy(y.targets)[:, None]).squeeze(1)
        np.testing.assert_allclose(tgt.numpy(), y.logprobs, atol=1e-4)
    d = remote.describe()
    assert d["kind"] == "openai" and not d["exact_distribution"] and d["top_logprobs"] == 20
    assert {"distribution", "logit_scale", "hidden", "routing", "gradients"} <= set(d["limits"])


def test_continuations_and_generation_agree(remote: OpenAILM, local: EngineLM,
                                            docs: list[list[int]]) -> None:
    reqs = [ContinuationRequest(d[:8], d[8:12]) for d in docs]
    np.testing.assert_allclose([s.total for s in remote.loglikelihood(reqs)],
                               [s.total for s in local.loglikelihood(reqs)], atol=1e-4)
    gens = [GenerateRequest(d[:10], 5) for d in docs[:3]] + [GenerateRequest(docs[0][:4], 3)]
    assert [g.text for g in remote.generate_until(gens)] == \
        [g.text for g in local.generate_until(gens)]


def test_connection_errors_are_one_line(model_dir: Path, tmp_path: Path, served) -> None:  # type: ignore[no-untyped-def]
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(TrustmoeError, match="cannot reach"):
        OpenAILM.connect(f"http://127.0.0.1:{port}/v1", model_dir)
    with pytest.raises(TrustmoeError, match="http"):
        OpenAILM.connect("127.0.0.1:8000", model_dir)
    with pytest.raises(TrustmoeError, match="tokenizer"):
        OpenAILM.connect(served.url, tmp_path)
    with pytest.raises(TrustmoeError, match="--tokenizer"):
        open_lm("openai", model_url=served.url)
    with pytest.raises(TrustmoeError, match="404"):
        lm = OpenAILM.connect(served.url, model_dir, model="no-such-model")
        lm.loglikelihood([ContinuationRequest([5], [6])])
