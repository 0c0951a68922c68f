"""What each audit finding means, what the build did about it, and what to do: the words
`audit.html`, `DATASHEET.md` and the `data build` summary print beside the numbers.

Presentation only: the detectors (`pii.py`, `poison.py`, ...) decide what is a finding; this
module explains findings and ranks the poisoning screen's leads so that known boilerplate
(licence and copyright headers, generated code-point and codec tables) sorts last, in its
own group, instead of reading as an attack. A detector may mark a finding itself with
`"boilerplate": "<why>"`; that label is used as given.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from trustmoe.data.pii import TYPE_MEANING

# Why a rule drops a document (the `rule` names of manifest.json / audit.json "dropped").
RULES: dict[str, str] = {
    "invalid_utf8": "not valid UTF-8 text",
    "binary": "binary data (NUL or many control bytes), not text",
    "unreadable": "the file could not be read",
    "malformed_record": "a JSONL/Parquet record without a text field",
    "all_records_dropped": "every record of the file was dropped",
    "empty": "the file held no documents",
    "license_not_allowed": "its licence is not in --allow-license",
    "too_short": "shorter than --min-chars",
    "too_long": "longer than --max-chars",
    "repetitive": "too many repeated lines (--max-repetition): usually generated or log-like",
    "exact_duplicate": "the same text (after normalising) as a document kept earlier",
    "near_duplicate": "nearly the same text (MinHash Jaccard over --near-threshold) as a "
                      "document kept",
    "pii": "it held personal data or a secret (--pii drop)",
    "contaminated": "it contains text of an evaluation set (--decontaminate)",
}

# Changes rules make to kept documents (audit.json counts.changed), in words.
CHANGES: dict[str, str] = {"pii_redacted": "PII values redacted"}

# What each kind of poisoning-screen finding is (kinds the detector does not list here are
# shown with its own `explanation` field, or generically).
POISON_KINDS: dict[str, str] = {
    "trigger_payload": "a rare word pair that, in several unrelated files, is followed by the "
                       "same words: the shape of a planted trigger → payload backdoor",
    "identical_insertion": "the same long, otherwise rare passage in several unrelated files: "
                           "the shape of one planted text copied into many files",
    "abnormal_characters": "a file whose characters differ sharply from the rest of the corpus, "
                           "or that hides invisible / bidirectional-control characters "
                           "(Trojan Source)",
}

LICENCE_HEADER = "licence header"
GENERATED_TABLE = "generated table"
SHARED_TEXT = "shared text"
BOILERPLATE: dict[str, str] = {
    LICENCE_HEADER: "licence, copyright or warranty text; the same notice in many files is "
                    "expected",
    GENERATED_TABLE: "code-point, codec or escape tables written by a generator (hex bytes, "
                     "Unicode character names)",
    SHARED_TEXT: "text that related files share (a common header, a file family's lines); the "
                 "screen itself ranks it below every lead",
}

_LICENCE_WORDS = re.compile(
    r"copyright|\blicen[cs]|rights reserved|warrant|hereby granted|permission notice|"
    r"disclaim|merchantab|liab(le|ility)|damages|profits|action of contract|without fee|"
    r"redistribut|\bpsf\b|spdx|th(is|e) software|documentation for any purpose|"
    r"advertising or publicity|acknowledg(e)?ment in the product|permission to use|"
    r"free of charge|\bas is\b|in all copies|use,? copy,? modify", re.I)
# hex bytes and code points (plain numbers are not: years in copyright lines are numbers)
_TABLE_TOKEN = re.compile(r"^(0x[0-9a-f]+|\\?x[0-9a-f]{2}|\\?u[0-9a-f]{4}|u\+[0-9a-f]{4,6})$", re.I)
_CHAR_NAMES = re.compile(
    r"\b(latin|cyrillic|greek|arabic|hebrew) (capital|small)|capital letter|small letter|"
    r"box drawings|quotation mark|angle quotation|pointing (double|single)|control character|"
    r"\b(left|right) (parenthesis|square bracket|curly bracket)|\b(half|full) block\b|"
    r"\bwith (acute|grave|diaeresis|cedilla|caron|circumflex)\b|\bdecoding_map\b|"
    r"\bencoding_map\b|\bcharmap\b", re.I)
_TABLE_DIRS = ("encodings/",)


def boilerplate_kind(finding: dict[str, Any]) -> str | None:
    """The kind of known boilerplate a poisoning finding is, or None for a lead to review."""
    mark = finding.get("boilerplate")
    if isinstance(mark, str) and mark:
        return mark
    if mark is True:
        return "boilerplate"
    pattern = " ".join(str(finding.get("pattern", "")).replace("→", " ").split())
    docs = [str(d) for d in finding.get("documents", [])]
    kind = finding.get("kind")
    if kind == "abnormal_characters":
        if "invisible" in pattern or "bidi" in pattern:
            return None  # hidden characters are never boilerplate
        if docs and all(any(t in d for t in _TABLE_DIRS) for d in docs):
            return GENERATED_TABLE
        return None
    tokens = pattern.split()
    tabular = sum(bool(_TABLE_TOKEN.match(t)) for t in tokens)
    if tokens and tabular / len(tokens) >= 0.3:  # mostly hex bytes or code points
        return GENERATED_TABLE
    if _LICENCE_WORDS.search(pattern):
        return LICENCE_HEADER
    if _CHAR_NAMES.search(pattern):
        return GENERATED_TABLE
    if docs and all(any(t in d for t in _TABLE_DIRS) for d in docs):
        return GENERATED_TABLE
    return SHARED_TEXT if kind == "shared_boilerplate" else None


def folder_of(doc_id: str) -> str:
    """The folder a document lies in (`source/pkg/sub` for `source/pkg/sub/mod.py`)."""
    return doc_id.split("#", 1)[0].rpartition("/")[0]


def within_one_package(finding: dict[str, Any]) -> bool:
    """All of the finding's documents lie in one package folder (below the source root): such
    repeats are most often shared code of that package, so they rank after the others."""
    docs = [str(d) for d in finding.get("documents", [])]
    folders = {"/".join(folder_of(d).split("/")[:2]) for d in docs}
    return len(docs) > 1 and len(folders) == 1 and all(folder_of(d).count("/") >= 1 for d in docs)


@dataclass
class PoisonReport:
    # to review: findings across folders first, then those within one package; each by score
    leads: list[dict[str, Any]] = field(default_factory=list)
    boilerplate: list[dict[str, Any]] = field(default_factory=list)  # each with "boilerplate_kind"
    by_boilerplate: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.leads) + len(self.boilerplate)


def rank_poisoning(findings: list[dict[str, Any]]) -> PoisonReport:
    """Split findings into leads and known boilerplate (ranked last). Leads whose documents
    span several folders come first, then those within one package; the detector's order (by
    score) is kept inside each group."""
    rep = PoisonReport()
    within: list[dict[str, Any]] = []
    for f in findings:
        kind = boilerplate_kind(f)
        if kind is not None:
            rep.boilerplate.append(dict(f, boilerplate_kind=kind))
        elif within_one_package(f):
            package = "/".join(folder_of(str(f["documents"][0])).split("/")[:2])
            within.append(dict(f, within_package=package + "/"))
        else:
            rep.leads.append(f)
    rep.leads += within
    rep.by_boilerplate = dict(Counter(f["boilerplate_kind"] for f in rep.boilerplate)
                              .most_common())
    return rep


def poison_kind_meaning(finding: dict[str, Any]) -> str:
    given = finding.get("explanation")
    if isinstance(given, str) and given:
        return given
    return POISON_KINDS.get(str(finding.get("kind")), "a pattern the poisoning screen flagged")


POISON_WHAT_TO_DO = (
    "Nothing was dropped: the screen only reports. Open the documents of each lead and read "
    "the text after the pattern. A shared idiom (argument parsing, month names) is harmless. "
    "If it is something nobody should learn (an instruction, a URL, a command, a secret), "
    "exclude those files (--exclude GLOB) and rebuild.")


@dataclass
class PiiType:
    type: str
    meaning: str
    findings: int
    documents: int
    top_documents: list[tuple[str, int]]


def pii_by_type(findings: list[dict[str, Any]], top: int = 5) -> list[PiiType]:
    """Findings grouped by type, most first, with the documents holding the most of each."""
    by_type: dict[str, Counter[str]] = {}
    for f in findings:
        by_type.setdefault(str(f.get("type")), Counter())[str(f.get("document"))] += 1
    out = [PiiType(t, TYPE_MEANING.get(t, "personal data or a secret"), sum(c.values()), len(c),
                   c.most_common(top)) for t, c in by_type.items()]
    return sorted(out, key=lambda p: (-p.findings, p.type))


def pii_action(mode: str) -> str:
    return {
        "redact": "replaced by placeholders like <EMAIL> in the training text; no document "
                  "dropped",
        "drop": "every document holding one was dropped",
        "keep": "left in the training text (--pii keep)",
    }.get(mode, f"handled with --pii {mode}")


def pii_what_to_do(mode: str) -> str:
    if mode == "keep":
        return ("The model may learn and repeat these values. Rebuild with --pii redact (the "
                "default) unless you are sure they are public.")
    if mode == "drop":
        return "Nothing: the documents are out. Use --pii redact to keep their other text."
    return ("Nothing, usually: the model never sees the values. In source code most are "
            "maintainer addresses in headers and example addresses in docstrings or tests. "
            "Spans in audit.json are character offsets in the text before redaction; use "
            "--pii drop to leave such documents out entirely.")


@dataclass
class Row:
    """One line of the audit at a glance: a check, what it found, what the build did, and
    what to do; `review` is True when a person should look."""

    check: str
    found: str
    done: str
    todo: str
    review: bool = False


QUALITY_RULES = ("invalid_utf8", "binary", "unreadable", "malformed_record", "empty",
                 "all_records_dropped", "too_short", "too_long", "repetitive")


def pii_mode(audit: dict[str, Any], default: str = "redact") -> str:
    actions = {str(f.get("action")) for f in audit.get("pii", []) if f.get("action")}
    return actions.pop() if len(actions) == 1 else default


def glance(audit: dict[str, Any]) -> list[Row]:
    """The audit in a few rows, the same words in audit.html and the `data build` summary."""
    c = audit.get("counts", {})
    rules: dict[str, int] = c.get("dropped_by_rule", {})
    rows: list[Row] = []
    lic = audit.get("licenses", {})
    und = len(lic.get("undetermined", []))
    n_lic = len([k for k in lic.get("counts", {}) if k != "NOASSERTION"])
    refused = rules.get("license_not_allowed", 0)
    rows.append(Row(
        "licences", f"{n_lic} licence(s); {und} document(s) undetermined",
        "recorded per file in manifest.json" + (f"; {refused} outside --allow-license dropped"
                                                if refused else ""),
        "declare the sources' licence with --license, or add SPDX headers" if und
        else "nothing", review=bool(und)))
    q = sum(rules.get(r, 0) for r in QUALITY_RULES)
    rows.append(Row("quality and decoding", f"{q} document(s) unusable",
                    "dropped" if q else "nothing to do", "nothing (see Dropped documents)"))
    exact, near = len(audit.get("exact_duplicates", [])), len(audit.get("near_duplicates", []))
    dup = rules.get("exact_duplicate", 0) + rules.get("near_duplicate", 0)
    rows.append(Row("duplicates", f"{exact} exact group(s), {near} near-duplicate cluster(s)",
                    f"{dup} copies dropped, one of each kept" if dup else "nothing to do",
                    "nothing"))
    pii = audit.get("pii", [])
    mode = pii_mode(audit)
    types = pii_by_type(pii)
    docs = len({f.get("document") for f in pii})
    keys = sum(t.findings for t in types if t.type == "KEY")
    found = (f"{len(pii)} in {docs} document(s): "
             + ", ".join(f"{t.findings} {t.type}" for t in types)) if pii else "none"
    todo = ("revoke every leaked key listed under PII and secrets; " if keys else "") + (
        pii_what_to_do(mode).split(". ")[0] + "." if pii else "nothing")
    rows.append(Row("PII and secrets", found, pii_action(mode) if pii else "nothing to do",
                    todo, review=bool(keys) or (bool(pii) and mode == "keep")))
    cont = audit.get("contamination", [])
    checked = "contamination_index" in audit or bool(cont)
    if not checked:
        rows.append(Row("eval contamination", "not checked (no --eval-set given)", "nothing",
                        "pass your benchmarks' test sets with --eval-set to check for leaks"))
    else:
        dropped = rules.get("contaminated", 0)
        rows.append(Row(
            "eval contamination", f"{len(cont)} eval item(s) found in training documents",
            f"{dropped} document(s) dropped (--decontaminate)" if dropped
            else "reported only" if cont else "nothing to do",
            "rebuild with --decontaminate, or do not report those eval items" if cont
            and not dropped else "nothing", review=bool(cont) and not dropped))
    rep = rank_poisoning(audit.get("poisoning", []))
    bp = ", ".join(f"{n} {k}" for k, n in rep.by_boilerplate.items())
    rows.append(Row(
        "poisoning screen", f"{len(rep.leads)} lead(s) to review"
        + (f"; {len(rep.boilerplate)} known boilerplate ({bp})" if rep.boilerplate else ""),
        "reported only; nothing dropped",
        "read the leads in audit.html (known boilerplate needs no action)" if rep.leads
        else "nothing", review=bool(rep.leads)))
    return rows
