"""The document pipeline: each rule is a small step that records why it dropped or changed a doc.

Order: read/decode → licence → quality → exact dedup → near dedup → PII → contamination →
poisoning screen (findings only). A dropped document keeps the name of the first rule that
dropped it; later rules skip it. Every step adds its findings to the audit under the keys the
dataset format promises (`exact_duplicates`, `near_duplicates`, `pii`, ...).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trustmoe.data import licenses, quality
from trustmoe.data.sources import RawDoc
from trustmoe.data.text import WordHasher, stable_hash


@dataclass
class Doc:
    id: str
    source: str
    path: str
    text: str | None
    license: str
    license_source: str = "declared"  # header | declared | license_file | undetermined
    fate: str = "kept"
    rule: str | None = None
    changes: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.fate == "kept"

    def drop(self, rule: str) -> None:
        self.fate, self.rule = "dropped", rule


Step = Callable[[list["Doc"], dict[str, Any]], None]


def decode_docs(
    raws: list[tuple[RawDoc, str, str]], qopts: quality.QualityOptions, allow: frozenset[str]
) -> tuple[list[Doc], Counter[str]]:
    """Decode raw documents and apply the licence and quality rules."""
    docs: list[Doc] = []
    errors: Counter[str] = Counter()
    for raw, lic, lic_src in raws:
        if "error" in raw.notes:
            err = raw.notes["error"]
            rule = ("invalid_utf8" if err == "invalid_utf8"
                    else "unreadable" if err.startswith("unreadable") else "malformed_record")
            errors[rule] += 1
            d = Doc(raw.id, raw.source, raw.path, None, lic, lic_src)
            d.drop(rule)
            docs.append(d)
            continue
        text, bad = quality.decode(raw.data, qopts.max_control_fraction)
        d = Doc(raw.id, raw.source, raw.path, text, lic, lic_src)
        if bad is not None:
            errors[bad] += 1
            d.drop(bad)
        elif not licenses.allowed(lic, allow):
            d.drop("license_not_allowed")
        elif (qrule := quality.check(text or "", qopts)) is not None:
            d.drop(qrule)
        docs.append(d)
    return docs, errors


def exact_dedup(docs: list[Doc], audit: dict[str, Any]) -> None:
    """Drop documents whose normalised text equals an earlier (by id) kept document's."""
    first: dict[str, Doc] = {}
    groups: dict[str, list[str]] = {}
    for d in docs:
        if not d.kept or d.text is None:
            continue
        h = stable_hash(d.text)
        if h in first:
            d.drop("exact_duplicate")
            groups.setdefault(h, [first[h].id]).append(d.id)
        else:
            first[h] = d
    audit["exact_duplicates"] = [
        {"kept": ids[0], "duplicates": ids[1:], "normalized_sha256": h}
        for h, ids in sorted(groups.items(), key=lambda kv: kv[1][0])
    ]


def run_steps(docs: list[Doc], steps: list[tuple[str, Step]], audit: dict[str, Any],
              on_step: Callable[[str], None] | None = None) -> None:
    for name, step in steps:
        if on_step is not None:
            on_step(name)
        step(docs, audit)


def summarize(docs: list[Doc], audit: dict[str, Any], errors: Counter[str]) -> None:
    """Fill the audit's `dropped`, `licenses` and `counts` entries from the final fates."""
    audit["dropped"] = {d.id: d.rule for d in docs if not d.kept}
    lic_counts = Counter(d.license for d in docs)
    lic_kept = Counter(d.license for d in docs if d.kept)
    audit["licenses"] = {
        "counts": dict(sorted(lic_counts.items())),
        "kept": dict(sorted(lic_kept.items())),
        "undetermined": sorted(d.id for d in docs if d.license == licenses.UNDETERMINED),
    }
    audit["decode_errors"] = dict(sorted(errors.items()))
    rules = Counter(d.rule for d in docs if not d.kept)
    changed: Counter[str] = Counter()
    for d in docs:
        changed.update(d.changes)
    audit["counts"] = {
        "documents": len(docs),
        "kept": sum(d.kept for d in docs),
        "dropped": len(docs) - sum(d.kept for d in docs),
        "dropped_by_rule": dict(sorted(rules.items())),
        "changed": dict(sorted(changed.items())),
        "kept_chars": sum(len(d.text or "") for d in docs if d.kept),
    }


class WordCache:
    """Word hashes of each document's current text, computed once and shared by the rules."""

    def __init__(self) -> None:
        self.hasher = WordHasher()
        self._by_id: dict[str, np.ndarray] = {}
        self.signatures: dict[str, np.ndarray] = {}  # MinHash, from the near-dup step

    def get(self, d: Doc) -> np.ndarray:
        wh = self._by_id.get(d.id)
        if wh is None:
            wh = self._by_id[d.id] = self.hasher.text(d.text or "")
        return wh

    def invalidate(self, d: Doc) -> None:
        self._by_id.pop(d.id, None)


def pipeline(opts: Any) -> list[tuple[str, Step]]:
    """The rule steps selected by the build options, in order."""
    cache = WordCache()
    steps: list[tuple[str, Step]] = []
    if opts.dedup in ("exact", "near"):
        steps.append(("exact dedup", exact_dedup))
    if opts.dedup == "near":
        steps.append(("near dedup (MinHash LSH)", lambda docs, audit: near_dedup(
            docs, audit, cache, opts.near)))
    else:
        steps.append(("near dedup: off", lambda docs, audit: audit.setdefault(
            "near_duplicates", [])))
    steps.append((f"PII and secrets ({opts.pii})", lambda docs, audit: pii_step(
        docs, audit, cache, opts.pii)))
    steps.append(("contamination", lambda docs, audit: contamination_step(
        docs, audit, cache, opts)))
    steps.append(("poisoning screen", lambda docs, audit: poison_step(
        docs, audit, cache, opts.poison)))
    return steps


def near_dedup(docs: list[Doc], audit: dict[str, Any], cache: WordCache, nopts: Any) -> None:
    from trustmoe.data.dedup import near_duplicate_clusters

    kept = [d for d in docs if d.kept]
    clusters = near_duplicate_clusters([d.id for d in kept], [cache.get(d) for d in kept], nopts,
                                       sig_store=cache.signatures)
    by_id = {d.id: d for d in kept}
    for c in clusters:
        members = c["documents"]
        assert isinstance(members, list)
        c["kept"] = members[0]
        for m in members[1:]:
            by_id[m].drop("near_duplicate")
    audit["near_duplicates"] = clusters


def pii_step(docs: list[Doc], audit: dict[str, Any], cache: WordCache, mode: str) -> None:
    from trustmoe.data import pii

    found: list[dict[str, Any]] = []
    for d in docs:
        if not d.kept or d.text is None:
            continue
        fs = pii.find(d.text)
        if not fs:
            continue
        found.extend({"document": d.id, "type": f.type, "span": [f.start, f.end],
                      "masked": f.masked(), "action": mode} for f in fs)
        if mode == "drop":
            d.drop("pii")
        elif mode == "redact":
            d.text = pii.redact(d.text, fs)
            d.changes["pii_redacted"] = d.changes.get("pii_redacted", 0) + len(fs)
            cache.invalidate(d)  # its signature is kept: a few redactions do not change it
    audit["pii"] = found


def contamination_step(docs: list[Doc], audit: dict[str, Any], cache: WordCache,
                       opts: Any) -> None:
    from trustmoe.data.contamination import NgramIndex, find_contamination, load_eval_set

    audit["contamination"] = []
    if not opts.eval_sets:
        return
    items = [it for p in opts.eval_sets for it in load_eval_set(p, opts.text_field)]
    index = NgramIndex(n=opts.ngram, min_words=opts.ngram_min_words,
                       hasher=cache.hasher).build(items)
    kept = [d for d in docs if d.kept]
    found = find_contamination([d.id for d in kept], [cache.get(d) for d in kept], index)
    audit["contamination"] = found
    audit["contamination_index"] = {"items": len(items), "indexed": len(index.items),
                                    "too_short": len(index.skipped), "ngram": opts.ngram}
    if opts.decontaminate:
        hit = {doc for f in found for doc in f["documents"]}  # type: ignore[attr-defined]
        for d in kept:
            if d.id in hit:
                d.drop("contaminated")


def poison_step(docs: list[Doc], audit: dict[str, Any], cache: WordCache, popts: Any) -> None:
    from trustmoe.data.poison import minhash_signer, screen

    kept = [d for d in docs if d.kept]
    hashes = [cache.get(d) for d in kept]
    fallback = minhash_signer(hashes)

    def sig(i: int) -> np.ndarray:
        s = cache.signatures.get(kept[i].id)
        return s if s is not None else fallback(i)

    audit["poisoning"] = screen([d.id for d in kept], [d.text or "" for d in kept], hashes,
                                popts, sig)
