"""Helpers shared by the engine tests (imported by name: tests have no packages)."""

from __future__ import annotations

import random

import torch

WORDS = ("the cat sat on a mat while dogs ran far away and birds sang songs of old "
         "kings who ruled lands beyond seas").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "."
            for _ in range(n)]


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
