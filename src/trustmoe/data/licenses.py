"""Licences: SPDX validation, detection from file headers and LICENSE files, allow-lists.

A document's licence is, in order: an `SPDX-License-Identifier:` line in its first 4 KiB, the
source's declared licence (`--license`), the licence recognised in the nearest LICENSE/COPYING
file between the document and its source root, or `NOASSERTION` (undetermined, flagged).
With `--allow-license`, a document enters only when its licence expression is satisfied by the
allow-list (`A OR B` needs one of them, `A AND B` needs both); undetermined ones stay out.
"""

from __future__ import annotations

import re
from pathlib import Path

from trustmoe.io import TrustmoeError

UNDETERMINED = "NOASSERTION"
LICENSE_FILE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING", "COPYING.txt")
_SPDX_LINE = re.compile(rb"SPDX-License-Identifier:\s*([A-Za-z0-9.+\-() ]+?)\s*(?:\*/|-->|$)", re.M)

# Phrases that identify common licence texts (checked in order; the first match wins).
_LICENSE_PHRASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AGPL-3.0-only", ("GNU AFFERO GENERAL PUBLIC LICENSE", "Version 3")),
    ("LGPL-3.0-only", ("GNU LESSER GENERAL PUBLIC LICENSE", "Version 3")),
    ("LGPL-2.1-only", ("GNU LESSER GENERAL PUBLIC LICENSE", "Version 2.1")),
    ("GPL-3.0-only", ("GNU GENERAL PUBLIC LICENSE", "Version 3")),
    ("GPL-2.0-only", ("GNU GENERAL PUBLIC LICENSE", "Version 2")),
    ("Apache-2.0", ("Apache License", "Version 2.0")),
    ("MPL-2.0", ("Mozilla Public License", "2.0")),
    ("PSF-2.0", ("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",)),
    ("BSD-3-Clause", ("Redistribution and use in source and binary forms", "Neither the name")),
    ("BSD-2-Clause", ("Redistribution and use in source and binary forms",)),
    ("MIT", ("Permission is hereby granted, free of charge",)),
    ("ISC", ("Permission to use, copy, modify, and/or distribute this software for any purpose",)),
    ("Unlicense", ("This is free and unencumbered software released into the public domain",)),
    ("CC0-1.0", ("CC0 1.0 Universal",)),
    ("CC-BY-4.0", ("Attribution 4.0 International",)),
)


def canonical(expr: str) -> str:
    """Validate an SPDX licence expression; return its canonical spelling."""
    expr = expr.strip()
    if expr == UNDETERMINED:
        return expr
    try:
        from packaging.licenses import InvalidLicenseExpression, canonicalize_license_expression
    except ImportError:  # packaging < 24.2: accept well-formed ids without the list check
        if not re.fullmatch(r"[A-Za-z0-9.+\-() ]+", expr):
            raise TrustmoeError(f"invalid SPDX licence expression: {expr!r}") from None
        return expr
    try:
        return str(canonicalize_license_expression(expr))
    except InvalidLicenseExpression as e:
        raise TrustmoeError(
            f"unknown SPDX licence {expr!r} ({e}); see https://spdx.org/licenses/"
        ) from None


def from_header(data: bytes) -> str | None:
    """The SPDX-License-Identifier in a file's first 4 KiB, if it names a valid licence."""
    m = _SPDX_LINE.search(data[:4096])
    if not m:
        return None
    try:
        return canonical(m.group(1).decode("ascii"))
    except TrustmoeError:
        return None


def classify_license_text(text: str) -> str | None:
    """Recognise a licence from the text of a LICENSE/COPYING file."""
    flat = " ".join(text.split())
    for spdx, phrases in _LICENSE_PHRASES:
        if all(p in flat for p in phrases):
            return spdx
    return None


class LicenseFiles:
    """Finds and caches the licence of the nearest LICENSE file above each document."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[Path, str | None] = {}

    def for_path(self, rel: str) -> str | None:
        if not self.root.is_dir():
            return None
        d = (self.root / rel).parent
        while True:
            lic = self._dir_license(d)
            if lic is not None or d == self.root or self.root not in d.parents:
                return lic
            d = d.parent

    def _dir_license(self, d: Path) -> str | None:
        if d not in self._cache:
            found = None
            for name in LICENSE_FILE_NAMES:
                p = d / name
                if p.is_file():
                    try:
                        found = classify_license_text(p.read_text("utf-8", errors="replace"))
                    except OSError:
                        found = None
                    if found:
                        break
            self._cache[d] = found
        return self._cache[d]


def resolve(data: bytes, declared: str | None, files: LicenseFiles, rel: str
            ) -> tuple[str, str]:
    """(licence, where it came from: header | declared | license_file | undetermined)."""
    if (lic := from_header(data)) is not None:
        return lic, "header"
    if declared:
        return declared, "declared"
    if (lic := files.for_path(rel)) is not None:
        return lic, "license_file"
    return UNDETERMINED, "undetermined"


def _ids(expr: str) -> list[str]:
    words = re.split(r"[()\s]+", expr)
    out, skip = [], False
    for w in words:
        if not w or w in ("AND", "OR"):
            continue
        if w == "WITH":
            skip = True
            continue
        if not skip:
            out.append(w)
        skip = False
    return out


def allowed(expr: str, allow: frozenset[str]) -> bool:
    """Is a licence expression satisfied by the allow-list? (no list: everything enters)."""
    if not allow:
        return True
    if expr == UNDETERMINED:
        return False
    if "(" not in expr and " OR " in expr and " AND " not in expr:
        return any(i in allow for i in _ids(expr))
    return all(i in allow for i in _ids(expr))
