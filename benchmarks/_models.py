"""Shared by the serving and llama.cpp benchmarks: a random-weight model directory whose
byte-level BPE tokenizer covers every id the model can emit (GGUF export needs one)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from trustmoe.config import ModelConfig


def write_random_model(out: Path, cfg: ModelConfig, seed: int = 0) -> ModelConfig:
    """Random weights of shape `cfg` plus a tokenizer padded to its vocab, saved in `out`."""
    from trustmoe.data.tokenizer import save_tokenizer, train_tokenizer
    from trustmoe.model import Transformer, save_model

    cfg = cfg.replace(eos_token_id=0, bos_token_id=0)
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(6000)]
    docs = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(400)]
    tok = train_tokenizer(docs, cfg.vocab_size)
    short = cfg.vocab_size - tok.get_vocab_size()
    if short > 0:  # pad so every id the model can emit decodes
        tok.add_tokens([f"<pad{i}>" for i in range(short)])
    save_tokenizer(tok, out)
    torch.manual_seed(seed)
    save_model(Transformer(cfg).eval(), out, tokenizer_file=out / "tokenizer.json")
    return cfg
