"""Contamination scan: recall of planted eval items in a large generated corpus, and MB/s/core.

Eval items (30-word passages) are generated; half of them are planted, re-cased and
re-spaced, into random documents of a generated corpus. trustmoe's n-gram hash index
(`NgramIndex`, 13-grams, NFKC + lower-case) scans the corpus in one process (one core), and
the peer, the classic Python approach (a set of word-13-gram tuples, as in GPT-3-style
decontamination scripts), scans the same corpus in the same process, interleaved. Both must
find the same items; recall is over the planted items, false positives over the others.

Speeds are MB per CPU-second of this process (`time.process_time`), i.e. MB/s per core,
which stays meaningful while other work shares the machine; wall seconds are printed too.

Reference point: corpus-assay (a Rust tool) reports about 3.5 MB/s per worker; target >= 5.

    python benchmarks/contamination.py              # ~40 MB corpus
    python benchmarks/contamination.py --mb 5       # quick
"""

from __future__ import annotations

import argparse
import json
import random
import time

from trustmoe.data.contamination import EvalItem, NgramIndex, find_contamination
from trustmoe.data.text import WordHasher, normalize, words

CORPUS_ASSAY_MB_S = 3.5


def make_corpus(mb: float, n_items: int, seed: int
                ) -> tuple[list[str], list[str], list[EvalItem], set[int]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(50_000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    items = [EvalItem("bench", i + 1, " ".join(rng.choices(vocab, weights, k=30)))
             for i in range(n_items)]
    planted = set(rng.sample(range(n_items), n_items // 2))
    texts: list[str] = []
    size = 0
    while size < mb * 1e6:
        t = " ".join(rng.choices(vocab, weights, k=rng.randint(200, 2000)))
        texts.append(t)
        size += len(t)
    for i in sorted(planted):
        d = rng.randrange(len(texts))
        ws = texts[d].split(" ")
        at = rng.randrange(len(ws))
        passage = "  ".join(items[i].text.split()).upper()  # different case and spacing
        texts[d] = " ".join([*ws[:at], passage, *ws[at:]])
    ids = [f"doc{i:06d}" for i in range(len(texts))]
    return ids, texts, items, planted


def ours(ids: list[str], texts: list[str], items: list[EvalItem], n: int) -> set[int]:
    hasher = WordHasher()
    index = NgramIndex(n=n, min_words=8, hasher=hasher).build(items)
    found = find_contamination(ids, [hasher.text(t) for t in texts], index)
    return {int(f["item"]) - 1 for f in found}  # type: ignore[call-overload]


def peer(texts: list[str], items: list[EvalItem], n: int) -> set[int]:
    grams: dict[tuple[str, ...], set[int]] = {}
    for i, it in enumerate(items):
        ws = words(normalize(it.text))
        for j in range(len(ws) - n + 1):
            grams.setdefault(tuple(ws[j : j + n]), set()).add(i)
    hit: set[int] = set()
    for t in texts:
        ws = words(normalize(t))
        for j in range(len(ws) - n + 1):
            g = grams.get(tuple(ws[j : j + n]))
            if g:
                hit |= g
    return hit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=40.0, help="corpus size in MB")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--ngram", type=int, default=13)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ids, texts, items, planted = make_corpus(args.mb, args.items, args.seed)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    ot, pt, ow, pw = [], [], [], []
    got = ref = set()
    for _ in range(args.repeats):
        t, w = time.process_time(), time.perf_counter()
        got = ours(ids, texts, items, args.ngram)
        ot.append(time.process_time() - t)
        ow.append(time.perf_counter() - w)
        t, w = time.process_time(), time.perf_counter()
        ref = peer(texts, items, args.ngram)
        pt.append(time.process_time() - t)
        pw.append(time.perf_counter() - w)
    o, p = min(ot), min(pt)
    print(json.dumps({
        "benchmark": "contamination scan (one process, one core)",
        "corpus_mb": round(mb, 2), "documents": len(texts), "eval_items": len(items),
        "planted": len(planted), "ngram": args.ngram,
        "trustmoe": {
            "cpu_seconds": round(o, 3), "wall_seconds": round(min(ow), 3),
            "mb_per_s_per_core": round(mb / o, 2),
            "recall": round(len(got & planted) / len(planted), 4),
            "false_positive_items": len(got - planted),
        },
        "python_ngram_set_peer": {
            "cpu_seconds": round(p, 3), "wall_seconds": round(min(pw), 3),
            "mb_per_s_per_core": round(mb / p, 2),
            "recall": round(len(ref & planted) / len(planted), 4),
            "false_positive_items": len(ref - planted),
        },
        "same_items_as_peer": got == ref,
        "speed_ratio_vs_peer": round(p / o, 2),
        "ratio_vs_corpus_assay_3.5_mb_s": round(mb / o / CORPUS_ASSAY_MB_S, 2),
        "target_mb_per_s_per_core": 5.0,
    }, indent=2))


if __name__ == "__main__":
    main()
