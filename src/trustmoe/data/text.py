"""Shared text normalisation and word n-gram hashing (dedup, contamination and poisoning).

Words are runs of characters other than whitespace and ASCII punctuation in NFKC-normalised,
lower-cased text. Each distinct word is hashed once (BLAKE2b, 8 bytes, so results are identical
across processes and machines); the hash of
an n-gram is a polynomial rolling hash of its word hashes mod 2^64, computed with numpy for the
whole document at once: h(w_i..w_{i+n-1}) = sum_k w_{i+k} * B^(n-1-k).
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata

import numpy as np

# Words: maximal runs of characters that are neither whitespace nor ASCII punctuation ("_" is
# a word character). After NFKC, full-width punctuation has become ASCII as well.
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation if c != "_"})
_WORD = re.compile(r"[^\s!-/:-@\[-^`{-~]+")
_BASE = np.uint64(0x100000001B3)  # FNV prime: odd, so multiplication is invertible mod 2^64


def normalize(text: str) -> str:
    """NFKC + lower-case (the normalisation every n-gram rule uses)."""
    return unicodedata.normalize("NFKC", text).lower()


def words(text: str) -> list[str]:
    """Words of already-normalised text."""
    return text.translate(_PUNCT_TO_SPACE).split()


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of `text` (same tokenisation as `words`)."""
    return [m.span() for m in _WORD.finditer(text)]


class WordHasher:
    """Maps words to stable uint64 hashes, caching each distinct word."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, ws: list[str]) -> np.ndarray:
        """(len(ws),) uint64."""
        cache = self._cache
        vals = list(map(cache.get, ws))
        if None in vals:
            for i, v in enumerate(vals):
                if v is None:
                    w = ws[i]
                    h = cache.get(w)
                    if h is None:
                        d = hashlib.blake2b(w.encode(), digest_size=8).digest()
                        h = cache[w] = int.from_bytes(d, "little")
                    vals[i] = h
        return np.array(vals, dtype=np.uint64)

    def text(self, text: str) -> np.ndarray:
        """Word hashes of raw text (normalised here)."""
        return self(words(normalize(text)))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """(len - n + 1,) uint64 rolling hashes of consecutive n-grams; empty when too short."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc = acc * _BASE + word_hashes[k : k + m]
    return acc


def stable_hash(text: str) -> str:
    """Hex SHA-256 of text normalised for exact dedup (NFKC, lower-case, whitespace collapsed)."""
    norm = " ".join(normalize(text).split())
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()
