"""A tiny random MoE model on the code-like test tokenizer, its eval profile, and request logs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from trustmoe.config import get_preset
from trustmoe.data.shards import write_shard
from trustmoe.data.tokenizer import save_tokenizer, train_tokenizer
from trustmoe.eval.profile import write_eval_profile
from trustmoe.model import Transformer, save_model

PROSE = ("the river ran quietly past the old mill while children played near the water and the "
         "wind carried leaves over the hill toward a small house where an old man read his letters").split()


WORDS = ("def class return import yield lambda self value items range print None True False for "
         "while if else elif try except with as open read write list dict").split()


def code_docs(n: int, seed: int) -> list[str]:
    """Python-like documents; func_0 .. func_{n-1}, so two seeds give the same distribution."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [f"def func_{i}(x, y):"]
        for _ in range(rng.randint(3, 8)):
            a, b = rng.sample(WORDS, 2)
            lines.append(f"    {a} = {b}(x) + {rng.randint(0, 99)}  # {rng.choice(WORDS)}")
        docs.append("\n".join([*lines, "    return x + y\n"]))
    return docs


def make_dataset(out: Path) -> Path:
    """A dataset dir whose 30 held-out documents are code_docs(30, seed=0)."""
    val, train = code_docs(30, 0), code_docs(200, 1)
    tok = train_tokenizer(val + train, 512)
    save_tokenizer(tok, out)
    for split, docs in (("val", val), ("train", train)):
        ids = np.concatenate([np.asarray([*tok.encode(d).ids, 0]) for d in docs])
        write_shard(out / f"{split}.bin", ids, tok.get_vocab_size())
    return out


def prose(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(PROSE) for _ in range(rng.randint(10, 30))).capitalize() + "." for _ in range(n)]


def make_model_and_profile(root: Path) -> tuple[Path, Path]:
    data_dir = make_dataset(root / "data")
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny").model).eval()
    mdir = root / "model"
    save_model(model, mdir, tokenizer_file=data_dir / "tokenizer.json",
               metadata={"dataset_manifest_sha256": "ab" * 32})
    edir = root / "eval"
    write_eval_profile(model, mdir, data_dir, data_dir / "tokenizer.json", edir, quick=True)
    return mdir, edir


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
