"""`SamplingParams.prompt_logits_from`: score only a prompt's tail, reusing cached context blocks.

The rows it returns must be the rows a full-prompt request returns (float noise at most: the
cached prefix changes where the computed chunk starts, never the maths), nothing before it is
computed, and the KV blocks of the unscored prefix come from the prefix cache when another
request computed them."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import random_prompts

from trustmoe.engine import Engine, SamplingParams
from trustmoe.model import Transformer

V = 512


def scored(engine: Engine, prompt: list[int], start: int | None,
           logprobs: int = 0) -> tuple[torch.Tensor, list[float | None], int]:
    """(prompt logits, prompt logprobs, cached prompt tokens) of one max_tokens=0 request."""
    p = SamplingParams(max_tokens=0, prompt_logprobs=logprobs, prompt_logits=True,
                       prompt_logits_from=start)
    rid = engine.add_request(prompt, p)
    while True:
        for o in engine.step():
            if o.request_id == rid and o.finished:
                assert o.prompt_logits is not None and o.prompt_logprobs is not None
                return o.prompt_logits, o.prompt_logprobs, o.num_cached_prompt_tokens


@pytest.fixture()
def engine(tiny_model: Transformer) -> Engine:
    return Engine(tiny_model, block_size=8, max_num_seqs=8)


def test_tail_rows_equal_the_full_prompts_rows(engine: Engine) -> None:
    prompt = random_prompts([40], V, seed=1)[0]
    full, full_lp, _ = scored(engine, prompt, None)
    assert full.shape == (39, V)
    for start in (1, 5, 17, 39):
        tail, lp, cached = scored(engine, prompt, start)
        assert tail.shape == (40 - start, V)  # row i predicts prompt token start + i
        torch.testing.assert_close(tail, full[start - 1:], atol=1e-5, rtol=1e-5)
        assert lp[:start] == [None] * start and len(lp) == 40
        torch.testing.assert_close(torch.tensor(lp[start:]), torch.tensor(full_lp[start:]),
                                   atol=1e-5, rtol=1e-5)
        assert cached <= start - 1  # a scored row's own position is never taken from the cache


def test_top_logprobs_are_padded_before_the_scored_rows(engine: Engine) -> None:
    prompt = random_prompts([20], V, seed=2)[0]
    p = SamplingParams(max_tokens=0, prompt_logprobs=2, prompt_logits_from=12)
    res = engine.generate([prompt], params=p)[0]
    assert res.prompt_top_logprobs is not None and res.prompt_logprobs is not None
    assert len(res.prompt_top_logprobs) == len(res.prompt_logprobs) == 20
    assert res.prompt_top_logprobs[:12] == [None] * 12
    assert all(t is not None and len(t) == 2 for t in res.prompt_top_logprobs[12:])


def test_a_shared_context_is_computed_once(engine: Engine, tiny_model: Transformer) -> None:
    ctx, a, b = random_prompts([29, 3, 5], V, seed=3)
    first, _, cached_first = scored(engine, ctx + a, len(ctx))
    assert cached_first == 0 and first.shape == (3, V)
    hits = engine.stats().prefix_cache_hits
    second, _, cached = scored(engine, ctx + b, len(ctx))
    assert cached == 24  # the context's 3 full blocks of 8; position 28 is recomputed
    assert engine.stats().prefix_cache_hits == hits + 3
    fresh = Engine(tiny_model, block_size=8, enable_prefix_caching=False)
    alone, _, c0 = scored(fresh, ctx + b, len(ctx))
    assert c0 == 0 and second.shape == (5, V)
    torch.testing.assert_close(second, alone, atol=1e-5, rtol=1e-5)


def test_without_it_scored_prompts_never_use_the_cache(engine: Engine) -> None:
    ctx = random_prompts([30], V, seed=4)[0]
    scored(engine, [*ctx, 5, 6], None)
    _, _, cached = scored(engine, [*ctx, 7, 8], None)
    assert cached == 0  # old behaviour: every position computed


def test_a_long_prompt_cut_into_chunks(tiny_model: Transformer) -> None:
    eng = Engine(tiny_model, block_size=8, prefill_chunk=16)
    prompt = random_prompts([50], V, seed=5)[0]
    full, _, _ = scored(eng, prompt, None)
    for start in (3, 20, 33, 49):  # first scored row in the 1st, 2nd, 3rd and 4th chunk
        tail, lp, _ = scored(eng, prompt, start)
        torch.testing.assert_close(tail, full[start - 1:], atol=1e-5, rtol=1e-5)
        assert lp[:start] == [None] * start and all(v is not None for v in lp[start:])


def test_batch_invariant_with_other_requests(engine: Engine) -> None:
    prompts = random_prompts([33, 12, 47, 21], V, seed=6)
    noise = random_prompts([5, 7], V, seed=7)
    alone = [scored(engine, q, 9)[0] for q in prompts]
    engine.pool.reset_prefix_cache()
    p = SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logits=True, prompt_logits_from=9)
    gen = SamplingParams(max_tokens=4)
    rids = [engine.add_request(prompts[0], p), engine.add_request(noise[0], gen),
            engine.add_request(prompts[1], p), engine.add_request(noise[1], gen),
            engine.add_request(prompts[2], p), engine.add_request(prompts[3], p)]
    got: dict[str, torch.Tensor] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.prompt_logits is not None:
                got[o.request_id] = o.prompt_logits
    for k, rid in enumerate((rids[0], rids[2], rids[4], rids[5])):
        assert torch.equal(got[rid], alone[k]), k  # the same bits alone or batched


@pytest.mark.parametrize(("start", "msg"), [(0, ">= 1"), (-2, ">= 1"), (True, ">= 1"),
                                            (10, "below the prompt length")])
def test_bad_values_are_refused(engine: Engine, start: int, msg: str) -> None:
    p = SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logits_from=start)
    with pytest.raises(ValueError, match=msg):
        engine.add_request(list(range(3, 13)), p)


def test_needs_prompt_logprobs(engine: Engine) -> None:
    with pytest.raises(ValueError, match="needs prompt_logprobs"):
        engine.add_request([3, 4, 5], SamplingParams(max_tokens=0, prompt_logits_from=1))
