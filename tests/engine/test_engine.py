"""Engine behaviour: parity with transformers, batch invariance, batching, caching, limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import random_prompts
from transformers import AutoModelForCausalLM

from trustmoe.config import ConfigError, get_preset
from trustmoe.engine import (
    Engine,
    EngineConfig,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)
from trustmoe.model import Transformer, save_model

MIXED = [3, 50, 20, 7, 100, 1, 33, 64, 12, 5, 80, 9, 17, 2, 40, 29]


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_greedy_matches_transformers_generate(preset: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Transformer(get_preset(preset).model).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = random_prompts([5, 17, 40], 512, seed=3)
    eng = Engine(tmp_path, kv_cache_mb=4, prefill_chunk=16)
    ours = eng.generate(prompts, max_tokens=24)  # batched, with chunked prefill
    for p, r in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24,
                              do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert r.token_ids == ref
        assert r.finish_reason == "length"


def test_greedy_is_batch_invariant_bit_for_bit(tiny_model: Transformer) -> None:
    prompts = random_prompts(MIXED, 512)
    eng = Engine(tiny_model, kv_cache_mb=4, prefill_chunk=64, enable_prefix_caching=False)
    assert eng.runner.group_rows >= 1
    sp = SamplingParams(max_tokens=12, logprobs=0)
    alone = [eng.generate([p], params=sp)[0] for p in prompts]
    batch = eng.generate(prompts, params=sp)  # 16 mixed-length requests at once
    for a, b in zip(alone, batch, strict=True):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]


def test_seeded_sampling_same_alone_or_batched(tiny_model: Transformer) -> None:
    prompts = random_prompts(MIXED[:8], 512, seed=5)
    eng = Engine(tiny_model, kv_cache_mb=4, enable_prefix_caching=False)

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=100 + i)

    alone = [eng.generate([p], params=params(i))[0].token_ids for i, p in enumerate(prompts)]
    batch = eng.generate(prompts, params=[params(i) for i in range(len(prompts))])
    assert [b.token_ids for b in batch] == alone
    other_seed = eng.generate([prompts[0]], params=SamplingParams(
        max_tokens=10, temperature=1.0, seed=999))[0].token_ids
    assert other_seed != alone[0]


def test_chunked_prefill_gives_the_same_tokens(tiny_model: Transformer) -> None:
    prompts = random_prompts([100, 37], 512, seed=7)
    a = Engine(tiny_model, kv_cache_mb=4, prefill_chunk=8).generate(prompts, max_tokens=10,
                                                                     logprobs=0)
    b = Engine(tiny_model, kv_cache_mb=4, prefill_chunk=256).generate(prompts, max_tokens=10,
                                                                       logprobs=0)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        for p, q in zip(x.logprobs, y.logprobs, strict=True):
            assert p.logprob == pytest.approx(q.logprob, abs=1e-4)


def test_long_prefill_does_not_stall_running_decodes(tiny_model: Transformer) -> None:
    eng = Engine(tiny_model, kv_cache_mb=4, prefill_chunk=16)
    short = eng.add_request([5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True))
    eng.step()  # prefill of the short request -> its first token
    eng.add_request(random_prompts([200], 512)[0], SamplingParams(max_tokens=2))
    steps_with_short = 0
    for _ in range(10):  # the 200-token prompt needs 13 chunks of 16
        outs = eng.step()
        steps_with_short += any(o.request_id == short and o.new_token_ids for o in outs)
        assert eng.stats().running == 2
    assert steps_with_short == 10  # the decode advanced on every step


def test_requests_join_and_leave_the_running_batch(tiny_model: Transformer) -> None:
    eng = Engine(tiny_model, kv_cache_mb=4)
    a = eng.add_request([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
    eng.step()
    b = eng.add_request([4, 5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
    outs = eng.step()
    assert {o.request_id for o in outs} == {a, b}  # b joined while a was decoding
    finished = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = (len(o.token_ids), o.finish_reason)
    assert finished == {a: (3, "length"), b: (5, "length")}
    st = eng.stats()
    assert st.running == st.waiting == 0 and st.kv_blocks_used == 0


def test_prefix_cache_reuses_blocks_and_changes_nothing(tiny_model: Transformer) -> None:
    shared = random_prompts([40], 512, seed=11)[0]
    p1, p2 = [*shared, 7, 8, 9], [*shared, 10, 11]
    eng = Engine(tiny_model, kv_cache_mb=4, block_size=16)
    eng.generate([p1], max_tokens=4)
    eng.add_request(p2, SamplingParams(max_tokens=6, logprobs=0), "second")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[0].num_cached_prompt_tokens == 32  # two full 16-token blocks of the prefix
    st = eng.stats()
    assert st.prefix_cache_hits >= 2 and st.prefix_cache_queries >= st.prefix_cache_hits
    fresh = Engine(tiny_model, kv_cache_mb=4, enable_prefix_caching=False)
    ref = fresh.generate([p2], max_tokens=6, logprobs=0)[0]
    assert outs[-1].token_ids == ref.token_ids
    got = [lp.logprob for o in outs for lp in o.logprobs]
    assert got == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-4)


def test_abort_frees_slot_and_blocks_at_once(tiny_model: Transformer) -> None:
    eng = Engine(tiny_model, kv_cache_mb=4, enable_prefix_caching=False)
    rid = eng.add_request(random_prompts([60], 512)[0], SamplingParams(max_tokens=100))
    eng.step()
    assert eng.stats().kv_blocks_used > 0
    eng.abort(rid)
    st = eng.stats()
    assert st.running == 0 and st.kv_blocks_used == 0
    outs = eng.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [(rid, True, "abort")]
    assert not eng.has_unfinished()
    eng.abort("no-such-request")  # harmless


def test_queue_bound_and_prompt_limits(tiny_model: Transformer) -> None:
    eng = Engine(tiny_model, kv_cache_mb=4, max_queue=2)
    eng.add_request([1, 2], SamplingParams())
    eng.add_request([1, 2], SamplingParams())
    with pytest.raises(QueueFullError):
        eng.add_request([1, 2], SamplingParams())
    with pytest.raises(PromptTooLongError, match="context"):
        eng.add_request([1] * 250, SamplingParams(max_tokens=10))
    small = Engine(tiny_model, kv_cache_mb=0.05, block_size=16)  # a handful of blocks
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        small.add_request([1] * 200, SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1, 512], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        eng.add_request([1], SamplingParams(temperature=-1))


def test_many_requests_beyond_batch_and_kv_budget_all_finish(tiny_model: Transformer) -> None:
    eng = Engine(tiny_model, kv_cache_mb=0.2, max_num_seqs=4, max_queue=8)
    prompts = random_prompts([30] * 20, 512, seed=2)
    res = eng.generate(prompts, max_tokens=8, ignore_eos=True)  # more than the queue holds
    assert all(len(r.token_ids) == 8 for r in res)
    assert eng.stats().kv_blocks_used == 0


def test_logprobs_and_prompt_logprobs_match_a_full_forward(tiny_model: Transformer) -> None:
    prompt = random_prompts([21], 512, seed=4)[0]
    eng = Engine(tiny_model, kv_cache_mb=4, prefill_chunk=8)
    r = eng.generate([prompt], params=SamplingParams(max_tokens=5, logprobs=3,
                                                     prompt_logprobs=0))[0]
    ids = torch.tensor([prompt + r.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(ids)[0], -1)  # (T, V)
    assert r.prompt_logprobs is not None and r.prompt_logprobs[0] is None
    want = [float(lp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert r.prompt_logprobs[1:] == pytest.approx(want, abs=1e-4)
    n = len(prompt)
    for j, tl in enumerate(r.logprobs):
        assert tl.logprob == pytest.approx(float(lp[n - 1 + j, r.token_ids[j]]), abs=1e-4)
        assert len(tl.top) == 3 and next(iter(tl.top)) == r.token_ids[j]  # greedy = top-1
    scored = eng.generate([prompt], params=SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert scored.token_ids == [] and scored.finish_reason == "length"
    assert scored.prompt_logprobs == pytest.approx(r.prompt_logprobs, abs=1e-5)


def test_prompt_top_logprobs_match_a_full_forward(tiny_model: Transformer) -> None:
    """prompt_logprobs = k > 0 also reports each prompt position's k best alternatives, across
    prefill chunks and with two prompts in one batch."""
    prompts = random_prompts([21, 13], 512, seed=5)
    eng = Engine(tiny_model, kv_cache_mb=4, prefill_chunk=8)
    got = eng.generate(prompts, params=SamplingParams(max_tokens=0, prompt_logprobs=3))
    for prompt, r in zip(prompts, got, strict=True):
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model(torch.tensor([prompt]))[0], -1)  # (T, V)
        tops = r.prompt_top_logprobs
        assert tops is not None and len(tops) == len(prompt) and tops[0] is None
        for i in range(1, len(prompt)):
            want = lp[i - 1].topk(3)
            top = tops[i]
            assert top is not None and list(top) == want.indices.tolist()
            assert list(top.values()) == pytest.approx(want.values.tolist(), abs=1e-4)
    tops0 = got[0].prompt_top_logprobs
    assert tops0 is not None
    again = eng.generate([prompts[0]], params=SamplingParams(max_tokens=2, prompt_logprobs=3))[0]
    assert again.prompt_top_logprobs is not None  # also while generating
    for a, b in zip(again.prompt_top_logprobs[1:], tops0[1:], strict=True):
        assert a is not None and b is not None and list(a) == list(b)
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
    plain = eng.generate([prompts[0]], params=SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert plain.prompt_logprobs is not None and plain.prompt_top_logprobs is None


def test_engine_takes_a_config_and_keyword_overrides(tiny_model: Transformer) -> None:
    base = EngineConfig(kv_cache_mb=1, block_size=8, max_num_seqs=3, prefill_chunk=32)
    eng = Engine(tiny_model, base, max_queue=5, device="cpu")
    c = eng.engine_config
    assert (c.kv_cache_mb, c.block_size, c.max_num_seqs, c.max_queue, c.device) == (1, 8, 3, 5, "cpu")
    assert base.max_queue == 256  # the caller's config is not changed
    assert eng.block_size == 8 and eng.scheduler.max_num_seqs == 3 and eng.scheduler.max_queue == 5
    assert eng.scheduler.prefill_chunk == 32
    per_block = 2 * 2 * 2 * 8 * 16 * 4  # K and V, layers, kv heads, block, head dim, fp32
    assert eng.pool.num_blocks == 2**20 // per_block
    with pytest.raises(ConfigError, match="unknown engine setting"):
        Engine(tiny_model, bogus=1)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        Engine(tiny_model, device="gpu")
    with pytest.raises(ConfigError, match="kv_cache_dtype must be None or one of float32, float16"):
        Engine(tiny_model, kv_cache_dtype="int8")
