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

from trustmoe.data import licenses, quality
from trustmoe.data.sources import RawDoc
from trustmoe.data.text import stable_hash


@dataclass
class Doc:
    id: str
    source: str
    path: str
    text: str | None
    license: str
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
    raws: list[tuple[RawDoc, str]], qopts: quality.QualityOptions, allow: frozenset[str]
) -> tuple[list[Doc], Counter[str]]:
    """Decode raw documents and apply the licence and quality rules."""
    docs: list[Doc] = []
    errors: Counter[str] = Counter()
    for raw, lic in raws:
        if "error" in raw.notes:
            err = raw.notes["error"]
            rule = "invalid_utf8" if err == "invalid_utf8" else "unreadable"
            errors[rule] += 1
            d = Doc(raw.id, raw.source, raw.path, None, lic)
            d.drop(rule)
            docs.append(d)
            continue
        text, rule = quality.decode(raw.data, qopts.max_control_fraction)
        d = Doc(raw.id, raw.source, raw.path, text, lic)
        if rule is not None:
            errors[rule] += 1
            d.drop(rule)
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


def pipeline(opts: Any) -> list[tuple[str, Step]]:
    """The rule steps selected by the build options, in order."""
    steps: list[tuple[str, Step]] = []
    if opts.dedup in ("exact", "near"):
        steps.append(("exact dedup", exact_dedup))
    return steps
