"""Contamination: training documents that share word n-grams with an evaluation item.

Eval items are normalised (NFKC, lower-case), split into words, and every n-gram (default 13)
is hashed into an index: a sorted uint64 array of n-gram hashes with the item of each. A
document is checked by hashing its own n-grams and looking them up in the index with one
vectorised `np.searchsorted`; no document is ever compared with an item pair by pair. An item
shorter than n words (but at least `min_words`) is indexed as one n-gram of its own length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trustmoe.data.text import WordHasher, ngram_hashes, normalize, words
from trustmoe.io import TrustmoeError

TEXT_FIELDS = ("text", "question", "prompt", "input", "content", "query")


@dataclass
class EvalItem:
    eval_set: str
    item: int  # 1-based line number in its file
    text: str


def load_eval_set(path: str | Path, text_field: str = "text") -> list[EvalItem]:
    """Items of a JSONL file (a text field per line) or a text file with one item per line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TrustmoeError(f"eval set not found: {path}") from None
    except OSError as e:
        raise TrustmoeError(f"cannot read eval set {path}: {e.strerror}") from None
    try:
        data = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrustmoeError(f"eval set {path} is not valid UTF-8 (byte {e.start})") from None
    lines = data.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    is_jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson") or first.lstrip().startswith("{")
    items: list[EvalItem] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            items.append(EvalItem(path.name, n, line))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrustmoeError(f"eval set {path} line {n} is malformed JSON: {e.msg}") from None
        text = _item_text(rec, text_field)
        if text is None:
            raise TrustmoeError(
                f"eval set {path} line {n} has no text field ({text_field!r} or one of "
                f"{', '.join(TEXT_FIELDS)})")
        items.append(EvalItem(path.name, n, text))
    if not items:
        raise TrustmoeError(f"eval set {path} is empty")
    return items


def _item_text(rec: object, text_field: str) -> str | None:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return None
    for k in (text_field, *TEXT_FIELDS):
        v = rec.get(k)
        if isinstance(v, str):
            return v
    return None


@dataclass
class NgramIndex:
    """Sorted n-gram hashes of eval items, with the item each came from."""

    n: int = 13
    min_words: int = 8
    hasher: WordHasher = field(default_factory=WordHasher)
    items: list[EvalItem] = field(default_factory=list)
    skipped: list[EvalItem] = field(default_factory=list)  # too short to match reliably
    _keys: dict[int, np.ndarray] = field(default_factory=dict)  # gram length -> sorted hashes
    _owner: dict[int, np.ndarray] = field(default_factory=dict)  # gram length -> item index

    def build(self, items: list[EvalItem]) -> NgramIndex:
        per_len: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for it in items:
            wh = self.hasher(words(normalize(it.text)))
            if len(wh) < self.min_words:
                self.skipped.append(it)
                continue
            k = min(self.n, len(wh))
            grams = np.unique(ngram_hashes(wh, k))
            idx = len(self.items)
            self.items.append(it)
            keys, owners = per_len.setdefault(k, ([], []))
            keys.append(grams)
            owners.append(np.full(len(grams), idx, dtype=np.int64))
        for k, (keys, owners) in per_len.items():
            allk = np.concatenate(keys)
            allo = np.concatenate(owners)
            order = np.argsort(allk, kind="stable")
            self._keys[k], self._owner[k] = allk[order], allo[order]
        return self

    def lookup(self, word_hashes: np.ndarray) -> dict[int, int]:
        """{item index: number of its n-grams found} for one document's word hashes."""
        hits: dict[int, int] = {}
        for k, keys in self._keys.items():
            grams = ngram_hashes(word_hashes, k)
            if len(grams) == 0:
                continue
            pos = np.searchsorted(keys, grams)
            pos[pos == len(keys)] = 0
            found = pos[keys[pos] == grams]
            if len(found) == 0:
                continue
            for p in np.unique(found):
                # every index entry equal to this hash (several items may share an n-gram)
                lo = np.searchsorted(keys, keys[p], side="left")
                hi = np.searchsorted(keys, keys[p], side="right")
                for owner in self._owner[k][lo:hi]:
                    hits[int(owner)] = hits.get(int(owner), 0) + 1
        return hits


def find_contamination(doc_ids: list[str], doc_hashes: list[np.ndarray], index: NgramIndex
                       ) -> list[dict[str, object]]:
    """[{eval_set, item, preview, documents, ngrams}] for every eval item found in some doc."""
    found: dict[int, dict[str, int]] = {}
    for doc_id, wh in zip(doc_ids, doc_hashes, strict=True):
        for item, count in index.lookup(wh).items():
            found.setdefault(item, {})[doc_id] = count
    out = []
    for item in sorted(found):
        it = index.items[item]
        docs = found[item]
        out.append({
            "eval_set": it.eval_set, "item": it.item, "preview": it.text[:80],
            "documents": sorted(docs), "ngrams_matched": max(docs.values()),
        })
    return out
