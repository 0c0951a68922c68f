"""The primitive: log-likelihoods equal transformers', batching changes nothing, windows cover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trustmoe.eval.backend_model import score_requests
from trustmoe.eval.loglik import (
    Request,
    continuation_requests,
    loglik,
    rolling_requests,
)
from trustmoe.eval.moe_diag import RoutingCollector, summarize_routing
from trustmoe.io import TrustmoeError


def test_loglik_equals_transformers(model_dir: Path, tokenizer, corpus_docs) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = corpus_docs["val"][:5]
    ours = loglik(model_dir, texts, batch_size=3, return_hidden=True)
    for text, s in zip(texts, ours, strict=True):
        ids = [0, *tokenizer.encode(text).ids]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()  # (T, V)
        ref = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        assert s.n == len(ids) - 1
        np.testing.assert_allclose(s.logprobs, ref.numpy(), atol=1e-4, rtol=0)
        p = ref.exp()
        ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)[:-1]
        np.testing.assert_allclose(s.entropy, ent.numpy(), atol=1e-4)
        greedy = logits[:-1].argmax(-1) == torch.tensor(ids[1:])
        np.testing.assert_array_equal(s.greedy, greedy.numpy())
        assert np.all(s.max_prob >= p.numpy() - 1e-6)
        assert s.hidden is not None and s.hidden.shape == (64,)


def test_batch_size_invariance(tiny_model, tokenizer, corpus_docs) -> None:  # type: ignore[no-untyped-def]
    texts = corpus_docs["val"][:9]
    a = loglik(tiny_model, texts, tokenizer, batch_size=1, return_hidden=True)
    b = loglik(tiny_model, texts, tokenizer, batch_size=4, return_hidden=True)
    c = loglik(tiny_model, texts, tokenizer, batch_size=9, return_hidden=True)
    again = loglik(tiny_model, texts, tokenizer, batch_size=4, return_hidden=True)
    for x, y in zip(b, again, strict=True):  # deterministic: bit-identical on a rerun
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
        np.testing.assert_array_equal(x.hidden, y.hidden)
    for x, y, z in zip(a, b, c, strict=True):
        for other in (y, z):
            np.testing.assert_allclose(x.logprobs, other.logprobs, atol=1e-5, rtol=0)
            np.testing.assert_allclose(x.entropy, other.entropy, atol=1e-5, rtol=0)
            np.testing.assert_allclose(x.hidden, other.hidden, atol=1e-5, rtol=0)


def test_sliding_window_scores_every_token_once(tiny_model, tokenizer, corpus_docs) -> None:  # type: ignore[no-untyped-def]
    text = " ".join(corpus_docs["val"][:6])
    ids = tokenizer.encode(text).ids
    assert len(ids) > 100
    full = loglik(tiny_model, [text], tokenizer, max_len=256)[0]
    win = loglik(tiny_model, [text], tokenizer, max_len=48, stride=16)[0]
    assert win.n == full.n == len(ids)
    np.testing.assert_array_equal(win.targets, np.array(ids))
    # early tokens see the same context in both; later ones see less context in windows
    np.testing.assert_allclose(win.logprobs[:47], full.logprobs[:47], atol=1e-5)
    with pytest.raises(TrustmoeError, match="stride"):
        loglik(tiny_model, [text], tokenizer, max_len=48, stride=48)


def test_rolling_requests_cover_each_position_once() -> None:
    ids = list(range(1, 101))
    for L, S in [(10, 3), (10, 9), (7, 1), (200, 50)]:
        reqs = rolling_requests(ids, L, S, 0)
        scored = [t for r in reqs for t in r.ids[r.start:]]
        assert scored == ids
        assert all(len(r.ids) <= L and r.start >= 1 for r in reqs)


def test_continuation_requests_match_full_text(tiny_model) -> None:  # type: ignore[no-untyped-def]
    ctx, cont = [5, 6, 7, 8], [9, 10, 11]
    (r,) = continuation_requests([(ctx, cont)], 256, 0)
    s = score_requests(tiny_model, [r])[0]
    full = loglik(tiny_model, [ctx + cont])[0]
    np.testing.assert_allclose(s.logprobs, full.logprobs[-3:], atol=1e-5)
    (short,) = continuation_requests([(list(range(3, 300)), cont)], 64, 0)
    assert len(short.ids) == 64 and short.ids[-3:] == cont
    assert short.ids[0] == 0 and short.ids[1:4] == [240, 241, 242]  # BOS kept, left-truncated


def test_temperature_and_logits(tiny_model) -> None:  # type: ignore[no-untyped-def]
    ids = [list(range(3, 40))]
    s1 = loglik(tiny_model, ids, return_logits=True)[0]
    s2 = loglik(tiny_model, ids, temperature=2.0)[0]
    assert s1.logits is not None and s1.logits.shape == (37, 512)
    tgt = torch.from_numpy(s1.targets)[:, None]
    ref = (s1.logits.double() / 2.0).log_softmax(-1).gather(1, tgt)
    np.testing.assert_allclose(s2.logprobs, ref.squeeze(1).numpy(), atol=1e-5)


def test_routing_collector_counts_real_tokens_only(tiny_model) -> None:  # type: ignore[no-untyped-def]
    reqs = [Request([0, 5, 6, 7, 8, 9], 1), Request([0, 5, 6], 1)]
    with RoutingCollector(tiny_model) as rc:
        score_requests(tiny_model, reqs, batch_size=2, routing=rc)
    summary = summarize_routing(rc)
    k = tiny_model.config.num_experts_per_tok
    for layer in summary["layers"]:
        assert layer["tokens"] == 9  # 6 + 3 real tokens, padding excluded
        assert sum(layer["tokens_per_expert"]) == 9 * k
        assert 0.0 <= layer["router_entropy"] <= 1.0


@pytest.mark.parametrize("bad", [[[]], [[0, 99999]]])
def test_bad_inputs(tiny_model, bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrustmoeError):
        loglik(tiny_model, bad)


def test_strings_need_tokenizer(tiny_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrustmoeError, match="tokenizer"):
        loglik(tiny_model, ["hello"])


def test_packed_groups_equal_separate_requests(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from trustmoe.eval.packed import score_groups

    groups = [
        ([5, 6, 7, 8, 9, 10], [[11, 12], [13], [14, 15, 16]]),
        ([20, 21], [[22], [23, 24]]),
        (list(range(30, 80)), [[81, 82, 83], [84]]),
    ]
    with RoutingCollector(tiny_model) as rc:
        packed = score_groups(tiny_model, groups, prefix=0, batch_size=2, routing=rc)
    for (ctx, conts), got in zip(groups, packed, strict=True):
        ref = score_requests(tiny_model, continuation_requests([(ctx, c) for c in conts], 256, 0))
        assert len(got) == len(conts)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_array_equal(g.targets, r.targets)
            np.testing.assert_allclose(g.logprobs, r.logprobs, atol=1e-5, rtol=0)
            np.testing.assert_allclose(g.entropy, r.entropy, atol=1e-5, rtol=0)
            np.testing.assert_array_equal(g.greedy, r.greedy)
    # routing counts each real packed token once: BOS + context + all continuations
    n_real = sum(1 + len(c) + sum(len(x) for x in cs) for c, cs in groups)
    assert summarize_routing(rc)["layers"][0]["tokens"] == n_real
    # long contexts are cut from the left so the longest continuation still fits
    (long_got,) = score_groups(tiny_model, [(list(range(3, 400)), [[5, 6], [7, 8]])], prefix=0)
    (long_ref,) = [score_requests(tiny_model, continuation_requests(
        [(list(range(3, 400)), [5, 6])], 256, 0))]
    np.testing.assert_allclose(long_got[0].logprobs, long_ref[0].logprobs, atol=1e-5)
    with pytest.raises(TrustmoeError):
        score_groups(tiny_model, [([1, 2], [[]])], prefix=0)
