"""The byte-level BPE tokenizer (exact round trip for any UTF-8, loadable by transformers) and
TextCodec, the one text encoding with the model's BOS, for our BPE and Llama-style tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from trustmoe.data.tokenizer import (
    EOS_TOKEN,
    TextCodec,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from trustmoe.io import TrustmoeError

CORPUS = ["def add(a, b):\n    return a + b\n", "naïve café — 日本語 テキスト 🙂\n",
          "for i in range(10):\n\tprint(i)\r\n"] * 30


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(CORPUS, 300), d)
    return d


def test_vocab_size_and_specials(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id(EOS_TOKEN) == 0


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_any_unicode(tok_dir: Path, text: str) -> None:
    tok = load_tokenizer(tok_dir)
    assert tok.decode(tok.encode(text).ids) == text


def test_transformers_fast_tokenizer_agrees(tok_dir: Path) -> None:
    ours = load_tokenizer(tok_dir)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    for text in ["  leading spaces", "def f():\n    pass", "émoji 🙂 mixed\tTABS"]:
        ids = ours.encode(text).ids
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.decode(ids) == text


@pytest.mark.parametrize("vocab", [10, 10**9])
def test_absurd_vocab_sizes(vocab: int) -> None:
    with pytest.raises(TrustmoeError, match="vocab size"):
        train_tokenizer(CORPUS, vocab)

# ---------------------------------------------------------------- TextCodec

CODEC_CORPUS = ["def add(a, b):\n    return a + b\n", "The river runs past the old stone mill.\n",
                "naïve café — 日本語 🙂\n"] * 20
TEXTS = ["def add(x, y):", "  leading spaces and\ttabs", "naïve 🙂", "x"]


def llama_style(tok: Tokenizer) -> Tokenizer:
    """`<s>`/`</s>` added, and a TemplateProcessing post-processor that puts `<s>` in front of
    every text by itself, as Llama's tokenizer.json does."""
    tok = Tokenizer.from_str(tok.to_str())
    tok.add_special_tokens(["<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer(CODEC_CORPUS, 300)


def test_our_bpe_gets_bos_from_config_and_tokenizer(bpe: Tokenizer, tmp_path: Path) -> None:
    c = TextCodec.create(bpe, bos_id=0, eos_id=0)
    assert not c.adds_bos and c.bos_id == 0 and c.prefix_id == 0
    for t in TEXTS:
        plain = bpe.encode(t).ids  # adds nothing by itself
        assert c.encode(t, add_bos=False) == plain
        assert c.encode(t, add_bos=True) == [0, *plain]
        assert c.decode(c.encode(t, add_bos=True)) == t  # BOS is special: skipped on decode
    assert c.encode("<|endoftext|>x", add_bos=True).count(0) == 1  # no double BOS
    assert c.encode_batch(TEXTS, add_bos=True) == [c.encode(t, add_bos=True) for t in TEXTS]
    # no config: the dir's tokenizer_config.json names it (save_tokenizer writes bos_token)
    save_tokenizer(bpe, tmp_path)
    assert TextCodec.from_dir(tmp_path).bos_id == 0
    # a config's BOS wins over the tokenizer's
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    d = TextCodec.from_dir(tmp_path)
    assert (d.bos_id, d.eos_id) == (1, 2) and d.encode("x", add_bos=True)[0] == 1


def test_llama_style_tokenizer_gives_the_same_ids(bpe: Tokenizer, tmp_path: Path) -> None:
    tok = llama_style(bpe)
    bos = tok.token_to_id("<s>")
    c = TextCodec.create(tok)  # no config: the post-processor's BOS
    assert c.adds_bos and c.bos_id == bos
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    for t in TEXTS:
        own = tok.encode(t).ids  # the tokenizer's own special-token handling
        assert own[0] == bos
        assert c.encode(t, add_bos=True) == own == hf.encode(t)
        assert c.encode(t, add_bos=False) == own[1:]
        assert c.encode("<s>" + t, add_bos=True) == own  # a template that renders <s> itself
    # the model config's BOS id is used even when the tokenizer would add another
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": bos}))
    assert TextCodec.from_dir(tmp_path).encode("x", add_bos=True) == tok.encode("x").ids


def test_bad_ids_and_files(bpe: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TrustmoeError, match="outside the vocabulary"):
        TextCodec.create(bpe, bos_id=10**6)
    save_tokenizer(bpe, tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(TrustmoeError, match="not valid JSON"):
        TextCodec.from_dir(tmp_path)
    with pytest.raises(TrustmoeError, match="not found"):
        TextCodec.from_dir(tmp_path / "nowhere")
