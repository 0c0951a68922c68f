"""Fixtures for server and export tests: a tiny random-weight model directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from trustmoe.config import get_preset
from trustmoe.model.hf import save_model
from trustmoe.model.transformer import Transformer


def make_model_dir(out: Path, data_dir: Path, preset: str = "tiny", seed: int = 0,
                   std: float = 0.2) -> Path:
    """A model with random weights (std large enough that greedy text varies) and a tokenizer."""
    cfg = get_preset(preset).model.replace(eos_token_id=0, bos_token_id=0)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    save_model(model, out, tokenizer_file=data_dir / "tokenizer.json", metadata={"test": True})
    shutil.copyfile(data_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve") / "tiny-moe", tiny_data_dir)


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve") / "tiny-dense", tiny_data_dir,
                          preset="tiny-dense")
