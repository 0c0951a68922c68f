"""Shared tiny fixtures for the eval tests: a tokenizer, a dataset dir and a tiny MoE model dir."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trustmoe.config import get_preset
from trustmoe.data.shards import write_shard
from trustmoe.data.tokenizer import save_tokenizer, train_tokenizer
from trustmoe.model.hf import save_model
from trustmoe.model.transformer import Transformer

_WORDS_TEXT = (
    "the a river stone bird flew over quiet valley morning light green hill "
    "small house old man walked slowly along road dog barked loudly children played "
    "near water wind carried leaves through open window rain fell softly on roof"
)
WORDS = _WORDS_TEXT.split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(3, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 9))]
            lines.append(" ".join(words).capitalize() + ".")
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="session")
def corpus_docs() -> dict[str, list[str]]:
    return {"train": make_docs(60, 1), "val": make_docs(40, 2)}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, corpus_docs: dict[str, list[str]]) -> Path:
    d = tmp_path_factory.mktemp("data")
    tok = train_tokenizer(corpus_docs["train"] + corpus_docs["val"], 512)
    save_tokenizer(tok, d)
    for split, docs in corpus_docs.items():
        ids: list[int] = []
        for doc in docs:
            ids.extend(tok.encode(doc).ids)
            ids.append(0)
        write_shard(d / f"{split}.bin", np.array(ids), 512)
    return d


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = get_preset("tiny").model
    model = Transformer(cfg).eval()
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Transformer,
              data_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("model")
    save_model(tiny_model, d, tokenizer_file=data_dir / "tokenizer.json",
               metadata={"training": {"steps": 0}})
    return d


@pytest.fixture(scope="session")
def tokenizer(data_dir: Path):  # type: ignore[no-untyped-def]
    from trustmoe.data.tokenizer import load_tokenizer

    return load_tokenizer(data_dir)
