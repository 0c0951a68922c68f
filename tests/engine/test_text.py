"""Text side: loading a model dir with its tokenizer, streaming deltas, stop strings and ids."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trustmoe.engine import Engine, SamplingParams
from trustmoe.engine.output import held_back


@pytest.fixture(scope="module")
def eng(tiny_dir: Path) -> Engine:
    return Engine(tiny_dir, kv_cache_mb=4)


def _stream(eng: Engine, prompt: str, params: SamplingParams) -> tuple[list[str], object]:
    rid = eng.add_request(prompt, params)
    deltas, last = [], None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                deltas.append(o.new_text)
                last = o
    return deltas, last


def test_model_dir_loads_with_tokenizer_and_name(eng: Engine, tiny_dir: Path) -> None:
    assert eng.model_name == tiny_dir.name
    assert eng.eos_token_id == 0  # <|endoftext|> from the tokenizer
    ids = eng.encode("the cat sat")
    assert eng.decode(ids) == "the cat sat"
    r = eng.generate(["the cat sat"], max_tokens=8, ignore_eos=True)[0]
    assert r.prompt_token_ids == ids and len(r.token_ids) == 8
    assert r.text == eng.decode(r.token_ids)


def test_stream_deltas_add_up_to_the_text(eng: Engine) -> None:
    deltas, last = _stream(eng, "the dogs", SamplingParams(max_tokens=20, ignore_eos=True))
    assert last is not None and last.finished
    assert "".join(deltas) == last.text  # type: ignore[attr-defined]
    assert last.text == eng.decode(last.token_ids)  # type: ignore[attr-defined]


def test_stop_string_cuts_text_and_is_never_streamed(eng: Engine) -> None:
    full = eng.generate(["the birds"], max_tokens=24, ignore_eos=True)[0]
    assert len(full.text) > 8
    stop = full.text[5:8]
    deltas, last = _stream(eng, "the birds",
                           SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))
    want = full.text[: full.text.find(stop)]
    assert last.text == want and last.finish_reason == "stop"  # type: ignore[attr-defined]
    assert "".join(deltas) == want
    assert all(stop not in d for d in deltas)
    assert len(last.token_ids) < 24  # type: ignore[attr-defined]


def test_stop_token_id_and_eos(eng: Engine) -> None:
    full = eng.generate(["the kings"], max_tokens=16, ignore_eos=True)[0]
    target = full.token_ids[4]
    r = eng.generate(["the kings"], max_tokens=16, stop_token_ids=[target])[0]
    first = full.token_ids.index(target)
    assert r.token_ids == full.token_ids[: first + 1]
    assert r.finish_reason == "stop"
    assert r.text == eng.decode(full.token_ids[:first])

    def force_eos(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(ids) < 3:
            return logits
        out = torch.full_like(logits, -math.inf)
        out[0] = 0.0
        return out

    r = eng.generate(["the kings"], params=SamplingParams(max_tokens=16,
                                                          logits_processors=[force_eos]))[0]
    assert r.token_ids[-1] == 0 and len(r.token_ids) == 4 and r.finish_reason == "stop"
    r = eng.generate(["the kings"], params=SamplingParams(
        max_tokens=6, ignore_eos=True, logits_processors=[force_eos]))[0]
    assert len(r.token_ids) == 6 and r.finish_reason == "length"


def test_held_back_finds_stop_prefixes() -> None:
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("ab", ["abc", "b"]) == 2
