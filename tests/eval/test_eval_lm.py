"""The LM interface: one set of requests, any backend; capabilities say what is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trustmoe.eval.backend_model import ModelLM
from trustmoe.eval.lm import Capabilities, ContinuationRequest, open_lm
from trustmoe.eval.loglik import loglik
from trustmoe.io import TrustmoeError


def test_requests_start_with_the_models_bos(tiny_model, tokenizer, enc) -> None:  # type: ignore[no-untyped-def]
    from trustmoe.config import get_preset
    from trustmoe.model.transformer import Transformer

    # the prefix is whatever the config names: here BOS = 3, not the EOS 0
    m = Transformer(get_preset("tiny").model.replace(bos_token_id=3, eos_token_id=0))
    m.load_state_dict(tiny_model.state_dict())
    lm = ModelLM.create(m.eval(), tokenizer=tokenizer)
    assert lm.prefix_id == 3 and lm.codec is not None and lm.codec.bos_id == 3
    ids = enc("The river stone")
    (s,) = lm.loglikelihood([ContinuationRequest(ids[:1], ids[1:])])
    import torch

    with torch.no_grad():
        ref = m(torch.tensor([[3, *ids]]))[0].log_softmax(-1)  # (T, V)
    want = [float(ref[i, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose(s.logprobs, want, atol=1e-5)
    # an LM is accepted by loglik() as is
    (r,) = loglik(lm, ["The river stone"])
    np.testing.assert_allclose(r.logprobs[1:], want, atol=1e-5)


def test_no_bos_anywhere_is_one_clear_error(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from trustmoe.config import get_preset
    from trustmoe.model.transformer import Transformer

    m = Transformer(get_preset("tiny").model)  # config names neither BOS nor EOS
    with pytest.raises(TrustmoeError, match="names no BOS"):
        ModelLM.create(m).loglikelihood_rolling([[5, 6, 7]])


def test_rolling_bad_inputs(lm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrustmoeError, match="empty"):
        lm.loglikelihood_rolling([[]])
    with pytest.raises(TrustmoeError, match="stride"):
        lm.loglikelihood_rolling([[5, 6, 7]], max_len=8, stride=8)
    with pytest.raises(TrustmoeError, match="max_len"):
        lm.loglikelihood_rolling([[5, 6, 7]], max_len=1)
    with pytest.raises(TrustmoeError, match="empty continuation"):
        lm.loglikelihood([ContinuationRequest([5], [])])


def test_capabilities_name_every_gap() -> None:
    assert Capabilities(hidden=True, routing=True, gradients=True).limits() == {}
    lim = Capabilities(exact=False, logit_scale=False, top_k=5).limits()
    assert set(lim) == {"distribution", "logit_scale", "hidden", "routing", "gradients"}
    assert "top-5" in lim["distribution"] and "black-box" in lim["gradients"]


def test_open_lm_rejects_what_cannot_work(model_dir: Path) -> None:
    cases = [
        (dict(backend="gpu"), "--backend"),
        (dict(backend="model", model_dir=model_dir, quantize="int8"), "--backend engine"),
        (dict(backend="engine", model_dir=model_dir, quantize="int3"), "int8 or int4"),
        (dict(backend="engine"), "model directory"),
        (dict(backend="openai"), "--model-url"),
        (dict(backend="openai", model_url="http://x/v1", quantize="int8"), "engine backend"),
    ]
    for kw, msg in cases:
        with pytest.raises(TrustmoeError, match=msg):
            open_lm(**kw)  # type: ignore[arg-type]
