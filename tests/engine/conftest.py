"""Shared engine fixtures: a tiny model directory with a real (tiny) BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import corpus

from trustmoe.config import get_preset
from trustmoe.data.tokenizer import save_tokenizer, train_tokenizer
from trustmoe.model import Transformer, save_model


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(get_preset("tiny").model).eval()
    with torch.no_grad():  # larger logits than the 0.02 init, so greedy has clear winners
        m.lm_head.weight.mul_(20)
    return m


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Transformer) -> Path:
    d = tmp_path_factory.mktemp("engine_model")
    tok = train_tokenizer(corpus(), 512)
    save_tokenizer(tok, d)
    save_model(tiny_model, d, metadata={"note": "engine tests"})
    return d


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP
    barriers make them ~20x slower; run the engine tests single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
