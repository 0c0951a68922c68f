"""Shared tiny fixtures for the eval tests: a tokenizer, a dataset dir and a tiny MoE model dir."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    # like a trained model: <|endoftext|> (id 0) is BOS and EOS in config.json
    cfg = get_preset("tiny").model.replace(bos_token_id=0, eos_token_id=0)
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


@pytest.fixture(scope="session")
def lm(tiny_model: Transformer, tokenizer):  # type: ignore[no-untyped-def]
    """The torch backend on the tiny model."""
    from trustmoe.eval.backend_model import ModelLM

    return ModelLM.create(tiny_model, tokenizer=tokenizer, batch_size=8)


@pytest.fixture(scope="session")
def enc(tokenizer):  # type: ignore[no-untyped-def]
    """Text -> ids without BOS, the way tasks encode (requests add the BOS)."""
    return lambda s: tokenizer.encode(s, add_special_tokens=False).ids


class Served:
    """An OpenAI-compatible server (`trustmoe.serve`) for `engine` on a free loopback port, run
    by uvicorn in a thread: the openai backend's tests talk to a real server over HTTP."""

    def __init__(self, engine: Any) -> None:
        import socket
        import threading

        import uvicorn

        from trustmoe.serve.app import create_app

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> Served:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="session")
def served(model_dir: Path) -> Iterator[Served]:
    """Our own server on the tiny model dir, for the whole session."""
    from trustmoe.engine import Engine

    with Served(Engine(model_dir, kv_cache_mb=32, max_num_seqs=16)) as srv:
        yield srv
