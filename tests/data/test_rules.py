"""Licence detection/validation and quality rules, each on inputs where the answer is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmoe.data import licenses, quality
from trustmoe.io import TrustmoeError


def test_spdx_validation_canonicalises_and_rejects_unknown() -> None:
    assert licenses.canonical("mit") == "MIT"
    assert licenses.canonical("apache-2.0 OR mit") == "Apache-2.0 OR MIT"
    with pytest.raises(TrustmoeError, match="unknown SPDX"):
        licenses.canonical("Totally-Free-1.0")


def test_header_detection() -> None:
    assert licenses.from_header(b"# SPDX-License-Identifier: BSD-3-Clause\nx = 1\n") == (
        "BSD-3-Clause")
    assert licenses.from_header(b"/* SPDX-License-Identifier: MIT */\n") == "MIT"
    assert licenses.from_header(b"x = 1\n" * 2000 + b"# SPDX-License-Identifier: MIT") is None
    assert licenses.from_header(b"# SPDX-License-Identifier: NotReal-1\n") is None


def test_license_file_detection_walks_up_to_the_root(tmp_path: Path) -> None:
    (tmp_path / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of "
                                      "charge, to any person obtaining a copy")
    sub = tmp_path / "vendored"
    sub.mkdir()
    (sub / "COPYING").write_text("                 Apache License\n   Version 2.0, January 2004")
    finder = licenses.LicenseFiles(tmp_path)
    assert finder.for_path("a/b/c.py") == "MIT"
    assert finder.for_path("vendored/x.py") == "Apache-2.0"
    assert licenses.LicenseFiles(tmp_path / "vendored").for_path("deep/x.py") == "Apache-2.0"
    assert licenses.classify_license_text("all rights reserved") is None


def test_allow_list_semantics() -> None:
    allow = frozenset({"MIT", "Apache-2.0"})
    assert licenses.allowed("MIT", allow)
    assert licenses.allowed("GPL-3.0-only OR MIT", allow)
    assert not licenses.allowed("MIT AND GPL-3.0-only", allow)
    assert licenses.allowed("Apache-2.0 WITH LLVM-exception", allow)
    assert not licenses.allowed(licenses.UNDETERMINED, allow)
    assert licenses.allowed(licenses.UNDETERMINED, frozenset())


def test_decode_rules() -> None:
    assert quality.decode(b"plain text\n") == ("plain text\n", None)
    assert quality.decode("\ufeffbom".encode()) == ("bom", None)
    assert quality.decode(b"\x89PNG\r\n\x1a\n\x00\x00") == (None, "binary")
    assert quality.decode(bytes([1, 2, 3, 4]) + b"a" * 50) == (None, "binary")
    assert quality.decode(b"caf\xe9") == (None, "invalid_utf8")


def test_quality_rules() -> None:
    opts = quality.QualityOptions(min_chars=10, max_chars=1000, max_repetition=0.5)
    assert quality.check("short", opts) == "too_short"
    assert quality.check("   \n\n\t          ", opts) == "too_short"
    assert quality.check("x" * 1001, opts) == "too_long"
    assert quality.check("same line\n" * 20, opts) == "repetitive"
    assert quality.check("\n".join(f"line {i}" for i in range(20)), opts) is None
    assert quality.repetition_ratio("a\nb\na\nb\n") == 0.5
