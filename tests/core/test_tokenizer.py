"""The byte-level BPE tokenizer: exact round trip for any UTF-8, loadable by transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from trustmoe.data.tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer, train_tokenizer
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
