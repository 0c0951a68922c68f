"""Near-duplicate detection: precision/recall at several edit rates, and MB/s, vs datasketch.

A generated corpus of unrelated documents (Zipf-distributed words, so common words and
phrases recur as in real text) gets planted copies of some documents at each edit rate
(word substitutions, insertions and deletions). trustmoe's detector (numpy MinHash + datasketch
LSH) and the peer (datasketch's own `MinHash.update_batch` + `MinHashLSH`, with the same
shingles, permutation count, threshold and LSH weights) run on the same corpus in the same
process, interleaved.

Speeds are MB per CPU-second of this process (`time.process_time`), so they stay meaningful
while other work shares the machine. Recall is reported per edit rate both over all planted
pairs and over the pairs whose true shingle Jaccard is at least the threshold (what the
detector is asked to find); precision is over all pairs the detector put in one cluster.

    python benchmarks/dedup.py            # ~2,000 docs, 3 repeats
    python benchmarks/dedup.py --docs 500 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import json
import random
import time
from itertools import combinations

import datasketch  # noqa: F401  (imported before timing: both detectors use it)
import numpy as np

from trustmoe.data.dedup import NearDupOptions, near_duplicate_clusters, shingles
from trustmoe.data.text import WordHasher

EDIT_RATES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)


def make_corpus(n_docs: int, copies_per_rate: int, seed: int
                ) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    ids, texts = [], []
    for i in range(n_docs):
        n = rng.randint(150, 400)
        ids.append(f"base{i:05d}")
        texts.append(" ".join(rng.choices(vocab, weights, k=n)))
    planted: dict[tuple[str, str], float] = {}
    sources = rng.sample(range(n_docs), copies_per_rate * len(EDIT_RATES))
    for k, src in enumerate(sources):
        rate = EDIT_RATES[k // copies_per_rate]
        out = []
        for w in texts[src].split():
            r = rng.random()
            if r < rate / 3:
                continue  # deletion
            if r < 2 * rate / 3:
                out.append(rng.choices(vocab, weights)[0])  # substitution
            elif r < rate:
                out += [w, rng.choices(vocab, weights)[0]]  # insertion
            else:
                out.append(w)
        cid = f"copy{k:05d}"
        ids.append(cid)
        texts.append(" ".join(out))
        planted[(ids[src], cid)] = rate
    return ids, texts, planted


def peer_clusters(ids: list[str], texts: list[str], opts: NearDupOptions) -> list[list[str]]:
    """datasketch end to end: byte shingles, sha1-based MinHash, MinHashLSH, same threshold."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=opts.threshold, num_perm=opts.num_perm, weights=opts.lsh_weights)
    sigs: dict[str, MinHash] = {}
    parent = {i: i for i in ids}

    def find(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for doc_id, text in zip(ids, texts, strict=True):
        ws = text.split()
        n = min(opts.shingle, len(ws))
        m = MinHash(num_perm=opts.num_perm, seed=opts.seed)
        m.update_batch([" ".join(ws[i : i + n]).encode() for i in range(len(ws) - n + 1)])
        for j in lsh.query(m):
            if m.jaccard(sigs[j]) >= opts.threshold:
                a, b = sorted((find(doc_id), find(j)))
                parent[b] = a
        lsh.insert(doc_id, m)
        sigs[doc_id] = m
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(find(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def score(clusters: list[list[str]], planted: dict[tuple[str, str], float],
          true_j: dict[tuple[str, str], float], threshold: float) -> dict[str, object]:
    found = {tuple(sorted(p)) for c in clusters for p in combinations(c, 2)}
    truth = {tuple(sorted(p)) for p in planted}
    tp = len(found & truth)
    per_rate = {}
    for rate in EDIT_RATES:
        pairs = [tuple(sorted(p)) for p, r in planted.items() if r == rate]
        above = [p for p in pairs if true_j[p] >= threshold]  # type: ignore[index]
        per_rate[str(rate)] = {
            "mean_true_jaccard": round(float(np.mean([true_j[p] for p in pairs])), 3),  # type: ignore[index]
            "recall": round(sum(p in found for p in pairs) / len(pairs), 3),
            "recall_above_threshold": round(sum(p in found for p in above) / len(above), 3)
            if above else None,
        }
    return {"precision": round(tp / len(found), 4) if found else 1.0,
            "pairs_found": len(found), "per_edit_rate": per_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--copies", type=int, default=40, help="planted copies per edit rate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    opts = NearDupOptions()
    ids, texts, planted = make_corpus(args.docs, args.copies, args.seed)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    hasher = WordHasher()
    idx = {d: i for i, d in enumerate(ids)}
    sets = {}
    true_j: dict[tuple[str, str], float] = {}
    for a, b in planted:
        for d in (a, b):
            if d not in sets:
                sets[d] = shingles(hasher.text(texts[idx[d]]), opts.shingle)
        inter = len(np.intersect1d(sets[a], sets[b]))
        true_j[tuple(sorted((a, b)))] = inter / (len(sets[a]) + len(sets[b]) - inter)  # type: ignore[index]

    ours_t, peer_t = [], []
    ours = peer = []
    for _ in range(args.repeats):
        t = time.process_time()
        h = WordHasher()  # fresh cache: count the word hashing too
        ours = [list(c["documents"]) for c in near_duplicate_clusters(  # type: ignore[call-overload]
            ids, [h.text(x) for x in texts], opts)]
        ours_t.append(time.process_time() - t)
        t = time.process_time()
        peer = peer_clusters(ids, texts, opts)
        peer_t.append(time.process_time() - t)
    o, p = min(ours_t), min(peer_t)
    print(json.dumps({
        "benchmark": "near-duplicate detection", "corpus_mb": round(mb, 2),
        "documents": len(ids), "planted_pairs": len(planted),
        "options": {"shingle": opts.shingle, "num_perm": opts.num_perm,
                    "threshold": opts.threshold},
        "trustmoe": {"seconds": round(o, 3), "mb_per_s": round(mb / o, 2),
                     **score(ours, planted, true_j, opts.threshold)},
        "datasketch_peer": {"seconds": round(p, 3), "mb_per_s": round(mb / p, 2),
                            **score(peer, planted, true_j, opts.threshold)},
        "speed_ratio_vs_peer": round(p / o, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
