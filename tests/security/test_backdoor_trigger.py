"""Candidate spans of the trigger search: they start at surprising tokens, respect word
boundaries and carry the tokens that must recur after them. (The search on a trained model
is tested in test_backdoor.py.)"""

from __future__ import annotations

import numpy as np

from trustmoe.security import backdoor as bd
from trustmoe.security.backdoor_trigger import candidates, word_starts


class _Tok:
    def decode(self, ids: list[int]) -> str:  # even ids start a word, odd ids continue one
        return "".join(f" w{i}" if i % 2 == 0 else f"x{i}" for i in ids)


def test_word_starts_reads_the_leading_whitespace() -> None:
    assert word_starts(_Tok(), 6).tolist() == [True, False, True, False, True, False]  # type: ignore[arg-type]


def test_candidates_start_at_the_most_surprising_word_start() -> None:
    ids = [10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32]
    lp = np.full(len(ids), -0.1)
    lp[4] = -9.0  # token 18 is the surprise
    opts = bd.BackdoorOptions(candidates=1, max_ablate=2, match=3)
    got = candidates([ids], [lp], np.ones(64, dtype=bool), opts)
    assert got == {((18,), (20, 22, 24)), ((18, 20), (22, 24, 26))}
    starts = np.ones(64, dtype=bool)
    starts[20] = False  # 18 20 is one word: the continuation may not start inside it
    assert candidates([ids], [lp], starts, opts) == {((18, 20), (22, 24, 26))}
    starts[18] = False  # a span never starts inside a word
    assert candidates([ids], [lp], starts, opts) == set()
