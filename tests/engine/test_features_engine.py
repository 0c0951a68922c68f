"""The engine's online features (EngineConfig.features) equal `features_from_model` on the same
prompts, through the torch prefill path and the C kernels' one-token chunks, chunked or whole,
MoE (with and without a shared expert) and dense; turning features on changes no output."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from engine_helpers import random_prompts

from trustmoe.config import get_preset
from trustmoe.engine import Engine, SamplingParams, cpu_kernels
from trustmoe.engine.features import RequestFeatures, features_from_model
from trustmoe.model import Transformer

LENGTHS = [1, 2, 7, 16, 17, 40, 90]  # single token, every position scored, 16 of many


def _model(variant: str) -> Transformer:
    torch.manual_seed(0)
    if variant == "dense":
        cfg = get_preset("tiny-dense").model
    else:
        cfg = get_preset("tiny").model
        if variant == "shared-expert":
            cfg = dataclasses.replace(cfg, shared_expert_intermediate_size=48)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def _serve(eng: Engine, prompts: list[list[int]], max_tokens: int = 3
           ) -> tuple[dict[str, RequestFeatures | None], dict[str, list[int]]]:
    feats: dict[str, RequestFeatures | None] = {}
    toks: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        eng.add_request(p, SamplingParams(max_tokens=max_tokens), f"r{i}")
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                feats[o.request_id] = o.features
                toks[o.request_id] = o.token_ids
    return feats, toks


def _same(got: RequestFeatures, want: RequestFeatures) -> None:
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    assert got.n_scored == want.n_scored
    for name in ("mean_nll", "mean_entropy", "mean_top1"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-4, abs=1e-5, nan_ok=True)
    np.testing.assert_allclose(got.hidden, want.hidden, rtol=1e-4, atol=1e-5)
    if want.routing is None:
        assert got.routing is None
    else:
        assert got.routing is not None
        np.testing.assert_array_equal(got.routing, want.routing)


@pytest.mark.parametrize("variant", ["moe", "shared-expert", "dense"])
@pytest.mark.parametrize(("prefill_chunk", "fast"), [(256, True), (1, True), (5, False)])
def test_online_features_equal_offline(variant: str, prefill_chunk: int, fast: bool) -> None:
    if fast and not cpu_kernels.available():
        pytest.fail("the C kernels are not built (no C compiler?): the fast path cannot be checked")
    m = _model(variant)
    prompts = random_prompts(LENGTHS, m.config.vocab_size, seed=3)
    eng = Engine(m, features=True, enable_prefix_caching=False, fast_decode=fast,
                 prefill_chunk=prefill_chunk, kv_cache_mb=8)
    # prefill_chunk=1 sends every prompt position through the C kernels' one-token path
    assert (eng.runner.fast is not None) == fast
    feats, _ = _serve(eng, prompts)
    want = features_from_model(m, prompts)
    for i, w in enumerate(want):
        got = feats[f"r{i}"]
        assert got is not None, f"request {i} finished without features"
        _same(got, w)


def test_features_change_no_output_and_default_off() -> None:
    m = _model("moe")
    prompts = random_prompts([3, 20, 33], m.config.vocab_size, seed=5)
    on = Engine(m, features=True, kv_cache_mb=8)
    off = Engine(m, kv_cache_mb=8)
    f_on, t_on = _serve(on, prompts, max_tokens=6)
    f_off, t_off = _serve(off, prompts, max_tokens=6)
    assert t_on == t_off
    assert all(f is not None for f in f_on.values())
    assert all(f is None for f in f_off.values())  # off by default: nothing computed
    assert not on._acc and not on._feats  # nothing left behind once requests finish


def test_aborted_request_leaves_nothing() -> None:
    m = _model("moe")
    eng = Engine(m, features=True, kv_cache_mb=8, prefill_chunk=4)
    eng.add_request(list(range(3, 30)), SamplingParams(max_tokens=4), "a")
    eng.step()  # first prefill chunk only
    eng.abort("a")
    outs = eng.step()
    assert [o.finish_reason for o in outs] == ["abort"] and outs[0].features is None
    assert not eng._acc and not eng._feats
