"""Sampling: parameter validation, and each logits transform against transformers' own."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trustmoe.engine.sampling import (
    SampleState,
    SamplingParams,
    apply_penalties,
    filter_probs,
    prompt_logprob_values,
    sample_rows,
    token_logprobs,
)


@pytest.mark.parametrize("kw, msg", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10_000}, "exceeds the model context"),
    ({"max_tokens": 2.5}, "integer"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "finite"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 5.0}, "presence_penalty"),
    ({"logprobs": 50}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 40}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_validate_rejects_absurd_values(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw).validate(max_model_len=256)  # type: ignore[arg-type]


def test_validate_accepts_sensible_values() -> None:
    SamplingParams(max_tokens=0, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                   repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5,
                   seed=7, stop=["\n"], stop_token_ids=[0], logprobs=5,
                   prompt_logprobs=0).validate(256)


def _logits(V: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("p, warpers", [
    (SamplingParams(temperature=0.7, top_k=5), [TemperatureLogitsWarper(0.7), TopKLogitsWarper(5)]),
    (SamplingParams(temperature=1.3, top_p=0.8),
     [TemperatureLogitsWarper(1.3), TopPLogitsWarper(0.8)]),
    (SamplingParams(temperature=1.0, min_p=0.1), [MinPLogitsWarper(0.1)]),
])
def test_filters_match_transformers(p: SamplingParams, warpers: list[object]) -> None:
    for seed in range(5):
        logits = _logits(seed=seed)
        ours = filter_probs(logits, p)
        ref = logits.clone()
        for w in warpers:
            ref = w(torch.zeros(1, 1, dtype=torch.long), ref[None])[0]  # type: ignore
        ref_p = torch.softmax(ref, dim=-1)
        ours = ours / ours.sum()
        torch.testing.assert_close(ours, ref_p, atol=1e-6, rtol=0)
        assert (ours > 0).sum() < logits.numel()  # something was actually filtered


def test_repetition_penalty_matches_transformers() -> None:
    logits = _logits()
    prompt, generated = [1, 2, 3, 3], [7, 1, 9]
    st = SampleState(SamplingParams(repetition_penalty=1.3), prompt)
    ours = apply_penalties(logits.clone(), st, generated)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + generated]), logits[None])
    torch.testing.assert_close(ours, ref[0])


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    logits = _logits()
    st = SampleState(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [4])
    st.counts = {7: 3, 9: 1}
    ours = apply_penalties(logits.clone(), st, [7, 9, 7, 7])
    want = logits.clone()
    want[7] -= 0.5 + 3 * 0.25
    want[9] -= 0.5 + 1 * 0.25
    torch.testing.assert_close(ours, want)


def test_logits_processor_sees_generated_ids_and_can_force_a_token() -> None:
    seen: list[list[int]] = []

    def only_42(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(ids)
        out = torch.full_like(logits, -math.inf)
        out[42] = 0.0
        return out

    p = SamplingParams(temperature=1.0, logits_processors=[only_42])
    st = SampleState(p, [1])
    for t in range(3):
        ids = sample_rows(_logits(seed=t)[None], [st], [[42] * t], None)
        assert ids == [42]
    assert seen == [[], [42], [42, 42]]


def test_seeded_sampling_is_reproducible_and_rows_are_independent() -> None:
    logits = torch.stack([_logits(seed=i) for i in range(4)])
    p = SamplingParams(temperature=1.0)

    def run(seeds: list[int], rows: torch.Tensor) -> list[int]:
        states = [SampleState(p, [1], torch.Generator().manual_seed(s)) for s in seeds]
        out = []
        for _ in range(20):
            out.append(sample_rows(rows, states, [[] for _ in seeds], None))
        return [o for step in out for o in step]

    a = run([1, 2, 3, 4], logits)
    b = run([1, 2, 3, 4], logits)
    assert a == b
    alone = run([3], logits[2:3])
    assert alone == a[2::4]  # row 2 draws the same tokens alone as in the batch


def test_greedy_rows_take_argmax() -> None:
    logits = torch.stack([_logits(seed=i) for i in range(3)])
    st = [SampleState(SamplingParams(), [1]) for _ in range(3)]
    assert sample_rows(logits, st, [[], [], []], None) == logits.argmax(-1).tolist()


def test_token_and_prompt_logprobs_are_log_softmax() -> None:
    logits = torch.stack([_logits(seed=i) for i in range(3)])
    got = token_logprobs(logits, [4, 5, 6], [0, 2, 3])
    lp = torch.log_softmax(logits, -1)
    for i, g in enumerate(got):
        assert g.logprob == pytest.approx(float(lp[i, 4 + i]), abs=1e-6)
    assert got[0].top == {}
    top = lp[2].topk(3)
    assert list(got[2].top) == top.indices.tolist()
    vals = prompt_logprob_values(logits, [9, 4, 5])
    assert vals[0] is None
    assert vals[1] == pytest.approx(float(lp[0, 4]), abs=1e-6)
    assert vals[2] == pytest.approx(float(lp[1, 5]), abs=1e-6)
