"""`trustmoe.generation` / `trustmoe.generate`: the engine's decode, checked against a plain
full-recompute greedy loop on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trustmoe
from trustmoe.config import get_preset
from trustmoe.data.tokenizer import TextCodec
from trustmoe.generation import generate_text
from trustmoe.io import TrustmoeError
from trustmoe.model.hf import save_model
from trustmoe.model.transformer import Transformer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    cfg = get_preset("tiny").model.replace(bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)  # random but decisive: greedy text varies
    d = tmp_path_factory.mktemp("gen") / "model"
    save_model(m, d, tokenizer_file=tiny_data_dir / "tokenizer.json")
    return d


def reference_greedy(model: Transformer, ids: list[int], n: int, eos: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if t == eos:
                break
            out.append(t)
    return out


def test_greedy_equals_plain_decode(model_dir: Path) -> None:
    prompt = "def func_2(x, y):"
    res = generate_text(model_dir, prompt, max_tokens=10)
    ids = TextCodec.from_dir(model_dir).encode(prompt, add_bos=True)
    assert res["prompt_token_ids"] == ids and ids[0] == 0  # the config's BOS in front
    model = trustmoe.load(model_dir)
    want = reference_greedy(model, ids, 10, eos=0)
    assert res["token_ids"] == want
    assert res["finish_reason"] == ("length" if len(want) == 10 else "stop")
    # the same through trustmoe.generate, from a dir and from a loaded model + tokenizer
    assert trustmoe.generate(model_dir, prompt, max_tokens=10) == res["text"]
    assert trustmoe.generate(model, prompt, max_tokens=10,
                             tokenizer=model_dir / "tokenizer.json") == res["text"]


def test_sampling_is_seeded_and_stops(model_dir: Path) -> None:
    a = generate_text(model_dir, "def", max_tokens=8, temperature=1.0, seed=3)
    assert a == generate_text(model_dir, "def", max_tokens=8, temperature=1.0, seed=3)
    stop = a["text"][2:4]
    if stop:
        cut = generate_text(model_dir, "def", max_tokens=8, temperature=1.0, seed=3, stop=[stop])
        assert cut["text"] == a["text"][: a["text"].find(stop)]


def test_bad_requests_are_one_line(model_dir: Path) -> None:
    with pytest.raises(TrustmoeError, match="context"):
        generate_text(model_dir, "x " * 400, max_tokens=4)
    with pytest.raises(TrustmoeError, match="tokenizer"):
        trustmoe.generate(trustmoe.load(model_dir), "hi")
    with pytest.raises(TrustmoeError, match="quantize"):
        generate_text(model_dir, "hi", quantize="int3")
