"""Verbatim extraction (Carlini et al. 2021, 2023): does greedy decoding reproduce a document?

For each document, the first `prefix_tokens` tokens (fewer for a short document, but at least
`MIN_PREFIX`) are the prompt and the next `suffix_tokens` the reference; the model continues
the prompt greedily (`LM.generate_until`, so through the engine's one sampler, or the
server's) for as many tokens. Reported per split:
the share of documents whose reference is reproduced exactly, and the mean share of the
reference's characters matched before the first difference. Training documents (members)
against held-out ones (non-members): a gap is memorisation, not just fluency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.eval.lm import GenerateRequest

if TYPE_CHECKING:
    from trustmoe.eval.lm import LM

MIN_PREFIX = 8


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_extraction(lm: LM, docs: Sequence[list[int]], prefix_tokens: int, suffix_tokens: int
                     ) -> dict[str, Any]:
    """Exact-match rate and matched-character share over the documents long enough."""
    codec = lm.codec
    usable = [d for d in docs if len(d) >= MIN_PREFIX + suffix_tokens]
    if codec is None or not usable:
        return {"n": 0, "exact_match_rate": None, "matched_fraction": None}
    cut = [min(prefix_tokens, len(d) - suffix_tokens) for d in usable]
    refs = [codec.decode(d[c:c + suffix_tokens]) for d, c in zip(usable, cut, strict=True)]
    gens = lm.generate_until([GenerateRequest(d[:c], suffix_tokens)
                              for d, c in zip(usable, cut, strict=True)])
    exact = np.array([float(g.text == r) for g, r in zip(gens, refs, strict=True)])
    frac = np.array([_common_prefix(g.text, r) / max(len(r), 1)
                     for g, r in zip(gens, refs, strict=True)])
    return {"n": len(usable), "exact_match_rate": float(exact.mean()),
            "matched_fraction": float(frac.mean())}


def extraction(lm: LM, members: Sequence[list[int]], nonmembers: Sequence[list[int]], *,
               n: int, prefix_tokens: int = 32, suffix_tokens: int = 16) -> dict[str, Any]:
    """Members (training documents) against non-members (held-out documents)."""
    mem = split_extraction(lm, members[:n], prefix_tokens, suffix_tokens)
    non = split_extraction(lm, nonmembers[:n], prefix_tokens, suffix_tokens)
    gap = None
    if mem["exact_match_rate"] is not None and non["exact_match_rate"] is not None:
        gap = mem["exact_match_rate"] - non["exact_match_rate"]
    return {"prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens, "members": mem,
            "nonmembers": non, "exact_match_gap": gap}
