"""Quality rules: decoding, binary/non-text detection, length bounds, repetition ratio.

Each rule is a small function that returns `None` (keep) or the reason it drops a document;
the build records the rule's name in the manifest. Defaults are tuned so the Python standard
library keeps every real source file: only empty stubs and generated repetitive tables go.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Control characters that never appear in text (tab, LF, VT, FF, CR and ESC are allowed).
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 11, 12, 13, 27))
_CONTROL_TABLE = bytes.maketrans(b"", b"")


@dataclass(frozen=True)
class QualityOptions:
    min_chars: int = 16  # shorter documents carry nothing to learn (empty __init__.py)
    max_chars: int = 4_000_000  # longer ones are usually generated data, not text
    max_repetition: float = 0.6  # max fraction of non-blank lines that repeat an earlier line
    max_control_fraction: float = 0.01  # above this, the file is binary


def decode(data: bytes | str, max_control_fraction: float = 0.01) -> tuple[str | None, str | None]:
    """(text, None) or (None, rule): `binary` for NUL/control-heavy bytes, `invalid_utf8`."""
    if isinstance(data, str):
        return data, None
    head = data[:65536]
    if b"\x00" in head:
        return None, "binary"
    if head:
        controls = len(head) - len(head.translate(_CONTROL_TABLE, _CONTROL))
        if controls / len(head) > max_control_fraction:
            return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, None


def repetition_ratio(text: str) -> float:
    """Fraction of non-blank lines that are exact repeats of an earlier line (0 = no repeats)."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) < 4:
        return 0.0
    counts = Counter(lines)
    repeats = sum(c - 1 for c in counts.values())
    return repeats / len(lines)


def check(text: str, opts: QualityOptions) -> str | None:
    """The quality rule that drops `text`, or None to keep it."""
    n = len(text)
    if n < opts.min_chars or not text.strip():
        return "too_short"
    if n > opts.max_chars:
        return "too_long"
    if repetition_ratio(text) > opts.max_repetition:
        return "repetitive"
    return None
