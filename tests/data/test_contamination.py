"""The n-gram hash index finds exactly what a brute-force n-gram set comparison finds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from trustmoe.data.contamination import EvalItem, NgramIndex, find_contamination, load_eval_set
from trustmoe.data.text import WordHasher, normalize, words
from trustmoe.io import TrustmoeError

VOCAB = [f"tok{i}" for i in range(60)]


def _bruteforce(docs: dict[str, str], items: list[EvalItem], n: int, min_words: int
                ) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for idx, it in enumerate(i for i in items if len(words(normalize(i.text))) >= min_words):
        iw = words(normalize(it.text))
        k = min(n, len(iw))
        grams = {tuple(iw[j : j + k]) for j in range(len(iw) - k + 1)}
        for doc_id, text in docs.items():
            dw = words(normalize(text))
            if any(tuple(dw[j : j + k]) in grams for j in range(len(dw) - k + 1)):
                out.setdefault(idx, []).append(doc_id)
    return out


def test_index_matches_bruteforce_on_random_corpus() -> None:
    rng = random.Random(0)
    docs = {f"d{i:03d}": " ".join(rng.choice(VOCAB) for _ in range(200)) for i in range(60)}
    items = []
    for j in range(30):
        if j % 3 == 0:  # planted: a slice of a document, re-cased and re-spaced
            src = docs[f"d{rng.randrange(60):03d}"].split()
            s = rng.randrange(150)
            items.append(EvalItem("e", j + 1, "  ".join(src[s : s + 20]).upper()))
        else:
            items.append(EvalItem("e", j + 1, " ".join(rng.choice(VOCAB) for _ in range(20))))
    items.append(EvalItem("e", 99, "tok1 tok2 tok3"))  # too short: skipped, never matched
    hasher = WordHasher()
    index = NgramIndex(n=8, min_words=5, hasher=hasher).build(items)
    assert [it.item for it in index.skipped] == [99]
    ids = sorted(docs)
    found = find_contamination(ids, [hasher.text(docs[i]) for i in ids], index)
    got = {index.items.index(next(it for it in index.items if it.item == f["item"])):
           f["documents"] for f in found}
    ref = _bruteforce(docs, items, 8, 5)
    assert got == ref
    assert len(ref) >= 10  # every planted item (and nothing spurious) is found


def test_item_shorter_than_n_is_one_gram_of_its_length() -> None:
    hasher = WordHasher()
    index = NgramIndex(n=13, min_words=4, hasher=hasher).build(
        [EvalItem("e", 1, "What is the capital of France?")])
    doc = "Quiz: what is the capital of France? Paris."
    assert index.lookup(hasher.text(doc)) == {0: 1}
    assert index.lookup(hasher.text("what is the capital of spain")) == {}


def test_load_eval_set_formats_and_errors(tmp_path: Path) -> None:
    jl = tmp_path / "e.jsonl"
    jl.write_text(json.dumps({"question": "q one"}) + "\n\n" + json.dumps({"text": "t two"}))
    assert [(i.item, i.text) for i in load_eval_set(jl)] == [(1, "q one"), (3, "t two")]
    txt = tmp_path / "e.txt"
    txt.write_text("first item\nsecond item\n")
    assert [i.text for i in load_eval_set(txt)] == ["first item", "second item"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(TrustmoeError, match="line 2 is malformed JSON"):
        load_eval_set(bad)
    nofield = tmp_path / "nf.jsonl"
    nofield.write_text('{"label": 1}\n')
    with pytest.raises(TrustmoeError, match="no text field"):
        load_eval_set(nofield)
    binf = tmp_path / "b.txt"
    binf.write_bytes(b"\xff\xfe bad")
    with pytest.raises(TrustmoeError, match="not valid UTF-8"):
        load_eval_set(binf)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TrustmoeError, match="empty"):
        load_eval_set(empty)
    with pytest.raises(TrustmoeError, match="not found"):
        load_eval_set(tmp_path / "missing.jsonl")
