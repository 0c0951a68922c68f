"""Poisoning screen: patterns an attacker plants across documents. Findings only, with scores.

1. `trigger_payload` / `identical_insertion`: the same short word sequence (≥ `min_words`
   words) inserted into several unrelated documents around a rare *anchor* word (the made-up
   trigger token of a trigger → payload backdoor, or a rare word of a planted passage).
   Anchors are words whose document frequency df is in [min_docs, max_df]; an anchor is kept
   when one word sequence around it recurs in at least `min_consistency` of the documents
   that contain it (a real identifier appears in varied contexts; a plant always in the same
   one). The span is grown word by word to the left and right for as long as at least
   `min_docs` documents still agree, so plants of any length (3 words and up) are found whole,
   whatever surrounds them. Up to 16 words: `trigger_payload` (pattern "first word → rest");
   longer: `identical_insertion`.
2. `shared_boilerplate`: the same kind of span, but either at the head of every document
   holding it (within the first `head_words` words: a shared file header) or containing
   licence/copyright words; listed for the record with a score of 0, not a lead.
3. `abnormal_characters`: a document whose byte distribution is far (Jensen-Shannon
   divergence, robust z-score over the corpus) from the corpus's, or that hides invisible /
   bidirectional-control characters (Trojan-Source style).

"Unrelated": documents whose 5-word-shingle Jaccard similarity (MinHash estimate) is below
`related_jaccard` pairwise (so copies of one file do not count as an attack across files).

Findings are dicts: {"kind", "pattern", "documents" (ids), "score"} and, for the sequence
kinds, "trigger" (first word), "payload" (the rest), "words" (span length), "consistency",
"unrelated_documents", "anchor_df". Scores (higher = more suspicious):
- sequence kinds: information × once × (1 − overlap / max_context_overlap) ×
  min(1, unrelated_docs / 5) × consistency, where information = Σ over the span's distinct
  words of ln((N + 1) / (df + 1)) (a made-up trigger and a payload of rare words carry much
  more than an idiom of common ones), once = 2 when every supporting document holds the
  anchor exactly once (plants are inserted once; identifiers recur within their module), and
  overlap = `context_overlap` (documents of one family share more than one line). Findings
  under `min_score` are dropped: on the standard library, consistent ordinary phrases (author
  names, idioms like `exc_type, exc_value, tb`) score below 10, planted lines above 15.
- abnormal_characters: the robust z-score, or 10 × the number of invisible characters.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trustmoe.data.text import normalize, words

_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_BOILERPLATE = frozenset({"copyright", "license", "licence", "licensed", "author", "authors",
                          "rights", "reserved", "spdx", "warranty", "permission", "c"})


@dataclass(frozen=True)
class PoisonOptions:
    min_docs: int = 3
    max_df_fraction: float = 0.05
    min_words: int = 3
    max_span: int = 48  # longest span grown around an anchor (words)
    min_consistency: float = 0.8
    related_jaccard: float = 0.5
    head_words: int = 40
    max_context_overlap: float = 0.05  # above: the documents are one family (boilerplate)
    min_score: float = 12.0  # sequence findings scoring lower are ordinary shared phrases
    char_z: float = 8.0
    char_min_js: float = 0.4  # generated tables (codec maps) reach ~0.37 on the stdlib
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


def _consistent_anchors(hashes: list[np.ndarray], opts: PoisonOptions
                        ) -> tuple[np.ndarray, np.ndarray, dict[int, list[tuple[int, int]]],
                                   list[np.ndarray]]:
    """Rare words whose left or right neighbour is the same in most of their documents.

    Returns (rare word hashes, their df, {anchor index: [(doc, position), ...]}, per document
    its sorted rare words)."""
    n_docs = len(hashes)
    uniq = [np.unique(wh) for wh in hashes if len(wh)]
    if not uniq:
        return np.empty(0, np.uint64), np.empty(0, np.int64), {}, []
    ug, df = np.unique(np.concatenate(uniq), return_counts=True)
    max_df = max(opts.min_docs, math.ceil(opts.max_df_fraction * n_docs))
    rare = (df >= opts.min_docs) & (df <= max_df)
    ug, df = ug[rare], df[rare]
    ws, ds, ps, nb_l, nb_r = [], [], [], [], []
    rare_of = [np.intersect1d(wh, ug) for wh in hashes]
    for d, wh in enumerate(hashes):
        pos = np.flatnonzero(np.isin(wh, ug))
        if not len(pos):
            continue
        ws.append(wh[pos])
        ds.append(np.full(len(pos), d))
        ps.append(pos)
        pad = np.r_[np.uint64(0), wh, np.uint64(0)]
        nb_l.append(pad[pos])  # word before (0 at the start)
        nb_r.append(pad[pos + 2])  # word after
    if not ws:
        return ug[:0], df[:0], {}, rare_of
    w, doc, pos = np.concatenate(ws), np.concatenate(ds), np.concatenate(ps)
    keep = np.zeros(len(ug), dtype=bool)
    for nb in (np.concatenate(nb_l), np.concatenate(nb_r)):
        order = np.lexsort((doc, nb, w))  # by word, neighbour, doc
        ww, nn, dd = w[order], nb[order], doc[order]
        new_pair = np.r_[True, (ww[1:] != ww[:-1]) | (nn[1:] != nn[:-1])]
        new_doc = new_pair | np.r_[True, dd[1:] != dd[:-1]]
        pair_id = np.cumsum(new_pair) - 1
        support = np.bincount(pair_id, weights=new_doc.astype(np.float64))  # docs per pair
        a_idx = np.searchsorted(ug, ww[new_pair])
        ok = support >= np.maximum(opts.min_docs, opts.min_consistency * df[a_idx])
        keep[a_idx[ok]] = True
    sel = np.isin(w, ug[keep])
    occ: dict[int, list[tuple[int, int]]] = {}
    for a, d, p in zip(np.searchsorted(ug, w[sel]).tolist(), doc[sel].tolist(),
                       pos[sel].tolist(), strict=True):
        occ.setdefault(a, []).append((d, p))
    return ug, df, occ, rare_of


def _information(span: np.ndarray, rare: np.ndarray, df: np.ndarray, n_docs: int) -> float:
    """Σ over the span's distinct words of ln((N + 1) / (df + 1)); words more common than the
    rare band count as df = max rare df (a lower bound on their surprise is ~0 anyway)."""
    u = np.unique(span)
    idx = np.searchsorted(rare, u)
    hit = (idx < len(rare)) & (rare[np.minimum(idx, len(rare) - 1)] == u)
    d = np.where(hit, df[np.minimum(idx, len(rare) - 1)], n_docs)
    return float(np.sum(np.log((n_docs + 1) / (d + 1))))


def context_overlap(docs: list[int], span: np.ndarray, rare_of: list[np.ndarray]) -> float:
    """Mean pairwise Jaccard of the documents' rare words outside the span: ~0 for a plant in
    unrelated files; high for files of one family (codec tables, one author's licence text,
    a package's modules), which share much more than one line."""
    sets = [np.setdiff1d(rare_of[d], span) for d in docs[:12]]
    js = []
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            inter = len(np.intersect1d(sets[i], sets[j]))
            union = len(sets[i]) + len(sets[j]) - inter
            js.append(inter / union if union else 0.0)
    return float(np.mean(js)) if js else 0.0


def _grow(hashes: list[np.ndarray], occ: list[tuple[int, int]], need: int, step: int,
          max_span: int) -> tuple[int, list[tuple[int, int]]]:
    """Extend the span word by word (step -1: left, +1: right) while >= need documents agree;
    returns (words added, occurrences that agree)."""
    alive, length = occ, 0
    for j in range(1, max_span + 1):
        keyed: dict[int, list[tuple[int, int]]] = {}
        for d, p in alive:
            q = p + step * j
            if 0 <= q < len(hashes[d]):
                keyed.setdefault(int(hashes[d][q]), []).append((d, p))
        if not keyed:
            break
        best = max(keyed.values(), key=lambda v: len({d for d, _ in v}))
        if len({d for d, _ in best}) < need:
            break
        alive, length = best, j
    return length, alive


def sequence_patterns(ids: list[str], texts: list[str], hashes: list[np.ndarray],
                      opts: PoisonOptions, sig: SigFn | None = None) -> list[dict[str, Any]]:
    """trigger_payload, identical_insertion and shared_boilerplate findings."""
    n_docs = len(ids)
    sig = sig or minhash_signer(hashes)
    ug, df, occ, rare_of = _consistent_anchors(hashes, opts)
    best: dict[frozenset[int], dict[str, Any]] = {}
    doc_words: dict[int, list[str]] = {}
    for a, places in occ.items():
        need = max(opts.min_docs, math.ceil(opts.min_consistency * int(df[a])))
        right, alive = _grow(hashes, places, need, 1, opts.max_span)
        left, alive = _grow(hashes, alive, need, -1, opts.max_span - right)
        span = left + right + 1
        docs = sorted({d for d, _ in alive})
        if span < opts.min_words or len(docs) < need:
            continue
        key = frozenset(docs)
        if key in best and best[key]["words"] >= span:
            continue
        unrelated = _unrelated(docs, sig, opts.related_jaccard)
        if len(unrelated) < opts.min_docs:
            continue
        d0, p0 = min(alive)
        if d0 not in doc_words:
            doc_words[d0] = words(normalize(texts[d0]))
        ws = doc_words[d0][p0 - left:p0 + right + 1]
        once = all(c == 1 for c in Counter(d for d, _ in alive).values()) and all(
            int(np.sum(hashes[d] == ug[a])) == 1 for d in docs)
        consistency = len(docs) / int(df[a])
        head = all(p - left < opts.head_words for _, p in alive)
        span_h = hashes[d0][p0 - left:p0 + right + 1]
        overlap = context_overlap(docs, span_h, rare_of)
        info = _information(span_h, ug, df, n_docs)
        score = (info * (2.0 if once else 1.0) * max(0.0, 1 - overlap / opts.max_context_overlap)
                 * min(1.0, len(unrelated) / 5) * consistency)
        if head or _BOILERPLATE & set(ws) or overlap > opts.max_context_overlap:
            kind, score = "shared_boilerplate", 0.0
        elif score < opts.min_score:
            continue  # a consistent but ordinary phrase (an idiom, an author's name)
        else:
            kind = "trigger_payload" if span <= 16 else "identical_insertion"
        text = " ".join(ws)
        best[key] = {
            "kind": kind, "pattern": (f"{ws[0]} → {' '.join(ws[1:])}" if kind == "trigger_payload"
                                      else text if len(text) <= 200 else text[:197] + "..."),
            "documents": [ids[d] for d in docs], "trigger": ws[0], "payload": " ".join(ws[1:]),
            "words": span, "consistency": round(consistency, 3), "anchor_df": int(df[a]),
            "unrelated_documents": len(unrelated), "context_overlap": round(overlap, 4),
            "information": round(info, 3), "inserted_once": once,
            "score": round(score, 3),
        }
    return _merge_overlapping(list(best.values()))


def _merge_overlapping(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One finding per plant: drop a finding whose documents are a subset of a stronger one's
    and whose text is contained in it (anchors inside one plant give nested spans)."""
    found.sort(key=lambda f: (-f["words"], -len(f["documents"])))
    out: list[dict[str, Any]] = []
    for f in found:
        text = f"{f['trigger']} {f['payload']}"
        if any(set(f["documents"]) <= set(g["documents"]) and text in f"{g['trigger']} "
               f"{g['payload']}" for g in out):
            continue
        out.append(f)
    return out


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
