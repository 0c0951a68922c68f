"""Shared fixtures: a tiny dataset directory built without any download."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from trustmoe.data.shards import write_shard
from trustmoe.data.tokenizer import eos_id, save_tokenizer, train_tokenizer

WORDS = (
    "def class return import yield lambda self value items range print None True False for "
    "while if else elif try except with as open read write list dict"
).split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """Python-like documents with enough structure for a tiny model to learn something."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [f"def func_{i}(x, y):"]
        for _ in range(rng.randint(3, 8)):
            a, b = rng.sample(WORDS, 2)
            lines.append(f"    {a} = {b}(x) + {rng.randint(0, 99)}  # {rng.choice(WORDS)}")
        lines.append("    return x + y\n")
        docs.append("\n".join(lines))
    return docs


def make_dataset(out: Path, n_docs: int = 300, vocab: int = 512, seed: int = 0) -> Path:
    docs = synthetic_docs(n_docs, seed)
    tok = train_tokenizer(docs, vocab)
    save_tokenizer(tok, out)
    eos = eos_id(tok)
    ids: list[list[int]] = [[*tok.encode(d).ids, eos] for d in docs]
    n_val = max(2, n_docs // 10)
    val = np.concatenate([np.asarray(x) for x in ids[:n_val]])
    train = np.concatenate([np.asarray(x) for x in ids[n_val:]])
    write_shard(out / "train.bin", train, tok.get_vocab_size())
    write_shard(out / "val.bin", val, tok.get_vocab_size())
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny_data"))
