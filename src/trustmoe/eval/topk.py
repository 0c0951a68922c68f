"""Distribution summaries estimated from top-k log-probabilities (what an OpenAI API returns).

A server that answers `echo=True, logprobs=k` gives, per prompt position, the log-probability
of the actual token (exact) and of the k most likely tokens. The rest of the vocabulary holds
the remaining mass r = 1 - sum(listed p); with nothing known about how r is spread, it is
spread evenly over the V - m unlisted tokens (the maximum-entropy completion). From that
distribution come entropy, Var[log p], max probability and sum of p² (estimates, labelled so
in eval.json); max-logit and log-partition are not identifiable from log-probabilities (NaN).
`pseudo_logits` writes the same distribution as (n, V) log-probabilities with each target at
its own id, so the temperature fit and next-token ECE run unchanged on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

MATCH_TOL = 1e-5  # a listed value within this of the target's log-probability is the target


def split_listed(target_lp: float, listed: Sequence[float], k: int) -> tuple[list[float], bool]:
    """The listed alternatives other than the target (at most k, largest first) and whether the
    target is the argmax. Servers list the target itself next to the top-k (lm-eval's greedy
    check reads that); it is recognised by value, as token strings may collide."""
    vals = sorted((float(v) for v in listed), reverse=True)
    for j, v in enumerate(vals):
        if abs(v - target_lp) <= MATCH_TOL:
            del vals[j]
            break
    others = vals[:k]
    greedy = not others or target_lp >= others[0] - MATCH_TOL
    return others, greedy


def _tail(known: np.ndarray, vocab_size: int) -> tuple[float, int]:
    """Remaining mass and how many unlisted tokens share it."""
    rest = max(vocab_size - len(known), 0)
    r = max(0.0, 1.0 - float(np.exp(known).sum())) if rest else 0.0
    return r, rest


def estimate(target_lps: Sequence[float], listed: Sequence[Sequence[float]], k: int,
             vocab_size: int) -> dict[str, np.ndarray]:
    """Per position: logprobs, greedy and the `Scored` summaries (estimated; lse/max_logit NaN)."""
    n = len(target_lps)
    out = {name: np.empty(n, dtype=np.float64) for name in
           ("logprobs", "entropy", "logp_var", "max_prob", "sum_p2")}
    greedy = np.zeros(n, dtype=bool)
    for i, (t, lst) in enumerate(zip(target_lps, listed, strict=True)):
        others, greedy[i] = split_listed(float(t), lst, k)
        known = np.array([float(t), *others], dtype=np.float64)  # log-probabilities
        p = np.exp(known)
        r, rest = _tail(known, vocab_size)
        q = r / rest if rest and r > 0 else 0.0  # each unlisted token's probability
        lq = math.log(q) if q > 0 else 0.0
        ent = -(p * known).sum() - r * lq
        mu = -ent  # E_p[log p]
        out["logprobs"][i] = float(t)
        out["entropy"][i] = ent
        out["logp_var"][i] = (p * (known - mu) ** 2).sum() + r * (lq - mu) ** 2
        out["max_prob"][i] = max(float(p.max()), q)
        out["sum_p2"][i] = (p * p).sum() + (r * q)
    nan = np.full(n, np.nan)
    return {**out, "greedy": greedy, "max_logit": nan, "lse": nan.copy()}


def pseudo_logits(targets: Sequence[int], target_lps: Sequence[float],
                  listed: Sequence[Sequence[float]], k: int, vocab_size: int) -> Tensor:
    """(n, V) log-probabilities of the estimated distributions, each target at its own id and
    the listed alternatives at other ids (which ones does not matter to calibration)."""
    rows = torch.empty(len(targets), vocab_size, dtype=torch.float32)
    for i, (y, t, lst) in enumerate(zip(targets, target_lps, listed, strict=True)):
        others, _ = split_listed(float(t), lst, k)
        known = np.array([float(t), *others], dtype=np.float64)
        r, rest = _tail(known, vocab_size)
        rows[i] = math.log(r / rest) if rest and r > 0 else -1e4
        cols = [c for c in range(len(others) + 1) if c != y][: len(others)]
        rows[i, y] = float(t)
        if others:
            rows[i, cols] = torch.tensor(others, dtype=torch.float32)
    return rows
