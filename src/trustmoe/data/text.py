"""Shared text normalisation and word n-gram hashing (dedup, contamination and poisoning).

Words are maximal runs of characters other than ASCII whitespace, ASCII control characters
and ASCII punctuation ("_" is a word character) in NFKC-normalised, lower-cased text; after
NFKC, full-width punctuation and no-break spaces have become ASCII as well.

Word hashes are computed without a Python loop over words: on the UTF-8 bytes of a document,
h(word) = fmix64(sum_j byte_j * B^(end-1-j) mod 2^64), taken from one prefix sum
C[i] = sum_{j<=i} byte_j * B^-j (B is odd, so invertible mod 2^64) as B^(end-1) * (C[end-1] -
C[start-1]). The hash of an n-gram is a polynomial rolling hash of its word hashes mod 2^64:
h(w_i..w_{i+n-1}) = sum_k w_{i+k} * B^(n-1-k). Everything is plain integer arithmetic, so the
values are identical across processes and machines.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata

import numpy as np

_WORD = re.compile(r"[^\x00-\x20!-/:-@\[-^`{-\x7f]+")
_BASE = np.uint64(0x100000001B3)  # FNV prime: odd, so multiplication is invertible mod 2^64
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_SEPARATOR = np.zeros(256, dtype=bool)  # byte -> is it a word separator?
_SEPARATOR[:33] = True
_SEPARATOR[127] = True
for _c in string.punctuation:
    if _c != "_":
        _SEPARATOR[ord(_c)] = True
_POW = np.ones(1, dtype=np.uint64)  # B^i, grown on demand
_POW_INV = np.ones(1, dtype=np.uint64)  # B^-i


def normalize(text: str) -> str:
    """NFKC + lower-case (the normalisation every n-gram rule uses)."""
    return unicodedata.normalize("NFKC", text).lower()


def words(text: str) -> list[str]:
    """Words of already-normalised text (the same words `hash_words` hashes)."""
    return _WORD.findall(text)


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of `text` (same tokenisation as `words`)."""
    return [m.span() for m in _WORD.finditer(text)]


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    global _POW, _POW_INV
    if len(_POW) < n:
        size = max(n, 2 * len(_POW))
        with np.errstate(over="ignore"):
            _POW = np.cumprod(np.r_[np.uint64(1), np.full(size - 1, _BASE)], dtype=np.uint64)
            _POW_INV = np.cumprod(np.r_[np.uint64(1), np.full(size - 1, _BASE_INV)],
                                  dtype=np.uint64)
    return _POW[:n], _POW_INV[:n]


def fmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xFF51AFD7ED558CCD)
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xC4CEB9FE1A85EC53)
        return x ^ (x >> np.uint64(33))


def hash_words(norm_text: str) -> np.ndarray:
    """(number of words,) uint64 hashes of the words of already-normalised text."""
    b = np.frombuffer(norm_text.encode("utf-8"), dtype=np.uint8)  # (n,)
    if len(b) == 0:
        return np.empty(0, dtype=np.uint64)
    is_word = ~_SEPARATOR[b]
    edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # exclusive
    if len(starts) == 0:
        return np.empty(0, dtype=np.uint64)
    pw, pw_inv = _powers(len(b))
    with np.errstate(over="ignore"):
        c = np.cumsum(b.astype(np.uint64) * pw_inv, dtype=np.uint64)  # (n,)
        before = np.where(starts > 0, c[np.maximum(starts - 1, 0)], np.uint64(0))
        raw = pw[ends - 1] * (c[ends - 1] - before)
    return fmix64(raw)


class WordHasher:
    """Word hashes of word lists or raw text (stateless; kept as a class for a stable API)."""

    def __call__(self, ws: list[str]) -> np.ndarray:
        """(len(ws),) uint64 for words without separators (as `words` returns them)."""
        return hash_words(" ".join(ws))

    def text(self, text: str) -> np.ndarray:
        """Word hashes of raw text (normalised here)."""
        return hash_words(normalize(text))


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
