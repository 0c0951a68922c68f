"""Poisoning screen: patterns an attacker plants across documents. Findings only, with scores.

1. `trigger_payload`: a rare word bigram (the trigger) that recurs in several unrelated
   documents and is followed, in most of its occurrences, by the same next `payload_words`
   words (the payload): the shape of trigger → payload backdoors.
2. `identical_insertion`: a longer identical word sequence shared by unrelated documents that
   is rare in the corpus (the same planted passage in many files).
3. `abnormal_characters`: a document whose byte distribution is far (Jensen-Shannon
   divergence, robust z-score over the corpus) from the corpus's, or that hides invisible /
   bidirectional-control characters (Trojan-Source style).

"Rare": the trigger bigram occurs in at most `max_df_fraction` of the documents. "Unrelated":
documents whose 5-word-shingle Jaccard similarity (MinHash estimate) is below
`related_jaccard` pairwise (so
copies of one file do not count as an attack across files).

Scores (higher = more suspicious):
- trigger_payload: unrelated_docs × consistency × ln((N + 1) / (df + 1)).
- identical_insertion: unrelated_docs × log2(span words) × ln((N + 1) / (df + 1)).
- abnormal_characters: the robust z-score, or 10 × the number of invisible characters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trustmoe.data.text import ngram_hashes, normalize, words

_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


@dataclass(frozen=True)
class PoisonOptions:
    min_docs: int = 3
    max_df_fraction: float = 0.05
    payload_words: int = 4
    min_consistency: float = 0.8
    related_jaccard: float = 0.5
    char_z: float = 8.0
    char_min_js: float = 0.2
    max_findings: int = 100  # per kind


SigFn = Callable[[int], np.ndarray]


def minhash_signer(hashes: list[np.ndarray], num_perm: int = 64) -> SigFn:
    """Signatures of documents on demand (cached), for the relatedness check."""
    from trustmoe.data.dedup import permutations, shingles, signature

    a, b = permutations(num_perm, 1)
    cache: dict[int, np.ndarray] = {}

    def sig(d: int) -> np.ndarray:
        if d not in cache:
            cache[d] = signature(shingles(hashes[d], 5), a, b)
        return cache[d]

    return sig


def _unrelated(docs: list[int], sig: SigFn, limit: float) -> list[int]:
    """Greedy subset of docs whose pairwise (MinHash-estimated) Jaccard is below `limit`."""
    chosen: list[np.ndarray] = []
    out: list[int] = []
    for d in docs:
        s = sig(d)
        if all(float(np.mean(s == t)) < limit for t in chosen):
            chosen.append(s)
            out.append(d)
    return out


def _consistent_pairs(hashes: list[np.ndarray], opts: PoisonOptions
                      ) -> dict[tuple[int, ...], list[tuple[int, int, float]]]:
    """Rare trigger bigrams with a consistent payload, grouped by the set of documents they
    occur in: {docs: [(position in the first doc, trigger df, consistency), ...]}."""
    n_docs, L = len(hashes), opts.payload_words
    gs, cs, ds, ps, uniq = [], [], [], [], []
    for d, wh in enumerate(hashes):
        m = len(wh)
        if m < 2 + L:
            continue
        g = ngram_hashes(wh, 2)[: m - 1 - L]  # trigger at word i: words i, i+1
        gs.append(g)
        cs.append(ngram_hashes(wh, L)[2 : 2 + len(g)])  # payload: words i+2 .. i+1+L
        ds.append(np.full(len(g), d, dtype=np.int64))
        ps.append(np.arange(len(g), dtype=np.int64))
        uniq.append(np.unique(g))
    if not gs:
        return {}
    ug, df = np.unique(np.concatenate(uniq), return_counts=True)  # document frequency
    max_df = max(opts.min_docs, math.ceil(opts.max_df_fraction * n_docs))
    rare = (df >= opts.min_docs) & (df <= max_df)
    ug, df = ug[rare], df[rare]
    g, c, doc, pos = (np.concatenate(x) for x in (gs, cs, ds, ps))  # (positions,) each
    sel = np.isin(g, ug)
    g, c, doc, pos = g[sel], c[sel], doc[sel], pos[sel]
    order = np.lexsort((pos, doc, c, g))  # sort by trigger, payload, doc, position
    g, c, doc, pos = g[order], c[order], doc[order], pos[order]
    if len(g) == 0:
        return {}
    new_pair = np.r_[True, (g[1:] != g[:-1]) | (c[1:] != c[:-1])]
    new_doc = new_pair | np.r_[True, doc[1:] != doc[:-1]]
    pair_id = np.cumsum(new_pair) - 1
    docs_per_pair = np.bincount(pair_id, weights=new_doc.astype(np.float64))  # (pairs,)
    df_pair = df[np.searchsorted(ug, g[new_pair])]
    good = (docs_per_pair >= opts.min_docs) & (docs_per_pair / df_pair >= opts.min_consistency)
    rows = np.nonzero(new_doc & good[pair_id])[0]
    by_pair: dict[int, list[tuple[int, int]]] = {}
    for r in rows.tolist():
        by_pair.setdefault(int(pair_id[r]), []).append((int(doc[r]), int(pos[r])))
    groups: dict[tuple[int, ...], list[tuple[int, int, float]]] = {}
    for pid, occ in by_pair.items():
        key = tuple(d for d, _ in occ)
        cons = float(docs_per_pair[pid] / df_pair[pid])
        groups.setdefault(key, []).append((occ[0][1], int(df_pair[pid]), cons))
    return groups


def sequence_patterns(ids: list[str], texts: list[str], hashes: list[np.ndarray],
                      opts: PoisonOptions, sig: SigFn | None = None) -> list[dict[str, Any]]:
    """trigger_payload and identical_insertion findings (one per set of documents)."""
    n_docs, L = len(ids), opts.payload_words
    sig = sig or minhash_signer(hashes)
    doc_words: dict[int, list[str]] = {}
    findings = []
    for docs_key, hits in _consistent_pairs(hashes, opts).items():
        unrelated = _unrelated(list(docs_key), sig, opts.related_jaccard)
        if len(unrelated) < opts.min_docs:
            continue
        hits.sort()
        runs: list[list[tuple[int, int, float]]] = [[hits[0]]]
        for h in hits[1:]:
            if h[0] > runs[-1][-1][0] + 1:
                runs.append([])
            runs[-1].append(h)
        run = max(runs, key=len)  # the longest shared run names the finding
        start, span = run[0][0], run[-1][0] - run[0][0] + 2 + L
        rarity = math.log((n_docs + 1) / (min(h[1] for h in run) + 1))
        if docs_key[0] not in doc_words:
            doc_words[docs_key[0]] = words(normalize(texts[docs_key[0]]))
        first_words = doc_words[docs_key[0]]
        if span <= 2 * (2 + L) and len(runs) == 1:
            kind = "trigger_payload"
            score = len(unrelated) * max(h[2] for h in run) * rarity
            pattern = " ".join(first_words[start : start + 2]) + " → " + " ".join(
                first_words[start + 2 : start + span])
        else:
            kind = "identical_insertion"
            score = len(unrelated) * math.log2(span) * rarity
            text = " ".join(first_words[start : start + span])
            pattern = text if len(text) <= 200 else text[:197] + "..."
        findings.append({
            "kind": kind, "pattern": pattern, "documents": [ids[d] for d in docs_key],
            "unrelated_documents": len(unrelated), "shared_runs": len(runs),
            "score": round(score, 3),
        })
    return findings


def character_anomalies(ids: list[str], texts: list[str], opts: PoisonOptions
                        ) -> list[dict[str, Any]]:
    """abnormal_characters findings: byte-distribution outliers and invisible characters."""
    findings: list[dict[str, Any]] = []
    if not texts:
        return findings
    hists = np.stack([np.bincount(np.frombuffer(t.encode("utf-8"), dtype=np.uint8),
                                  minlength=256) for t in texts]).astype(np.float64)  # (N, 256)
    corpus = hists.sum(0) / max(hists.sum(), 1.0)  # (256,)
    p = hists / np.maximum(hists.sum(1, keepdims=True), 1.0)  # (N, 256)
    mix = 0.5 * (p + corpus[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / mix), 0.0).sum(1)
        kl_c = np.where(corpus > 0, corpus * np.log2(corpus / mix), 0.0).sum(1)
    js = 0.5 * (kl_p + kl_c)  # (N,) in [0, 1]
    med = float(np.median(js))
    mad = float(np.median(np.abs(js - med))) * 1.4826 + 1e-6
    z = (js - med) / mad
    for i in np.nonzero((z > opts.char_z) & (js > opts.char_min_js))[0].tolist():
        top = np.argsort(-p[i])[:3]
        desc = ", ".join(f"{_byte_name(int(b))}={p[i][b]:.0%}" for b in top)
        findings.append({
            "kind": "abnormal_characters", "pattern": f"byte distribution JS={js[i]:.3f} ({desc})",
            "documents": [ids[i]], "score": round(float(z[i]), 3),
        })
    for i, t in enumerate(texts):
        hidden = _INVISIBLE.findall(t[1:] if t.startswith("\ufeff") else t)
        if hidden:
            codes = sorted({f"U+{ord(h):04X}" for h in hidden})
            findings.append({
                "kind": "abnormal_characters",
                "pattern": f"{len(hidden)} invisible/bidi characters ({', '.join(codes)})",
                "documents": [ids[i]], "score": float(10 * len(hidden)),
            })
    return findings


def _byte_name(b: int) -> str:
    return chr(b) if 33 <= b < 127 else f"0x{b:02x}"


def screen(ids: list[str], texts: list[str], hashes: list[np.ndarray], opts: PoisonOptions,
           sig: SigFn | None = None) -> list[dict[str, Any]]:
    """Findings, most suspicious first (at most `max_findings` of each kind). `sig(i)` gives
    document i's MinHash signature (the near-dup step's, when it ran)."""
    found = sequence_patterns(ids, texts, hashes, opts, sig) + character_anomalies(
        ids, texts, opts)
    found.sort(key=lambda f: (-f["score"], f["kind"], f["documents"], f["pattern"]))
    per_kind: dict[str, int] = {}
    out = []
    for f in found:
        per_kind[f["kind"]] = per_kind.get(f["kind"], 0) + 1
        if per_kind[f["kind"]] <= opts.max_findings:
            out.append(f)
    return out
