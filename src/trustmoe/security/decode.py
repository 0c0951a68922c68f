"""Unwrap text smuggled past a guard: encodings, invisible characters and look-alike letters.

`views(text)` returns what the guard scans besides the raw text:

- `normalized`: NFKC, Unicode tag characters (U+E0020–E007E, "ASCII smuggling") turned back
  into the ASCII they spell, zero-width and bidi-control characters removed, Cyrillic/Greek
  look-alikes folded to Latin, whitespace runs collapsed, lower-cased.
- `decoded`: every payload found inside it, unwrapped up to `MAX_DEPTH` layers: base64 /
  base64url, hex, URL percent-escapes, HTML character references, and ROT13 (kept only when
  it turns gibberish into English).

`signals` names what was found (`tag_chars`, `bidi`, `zero_width`, `homoglyph`, `base64`, ...):
hiding text is itself a reason to look closer. Everything here is linear in the input and
bounded (`MAX_PAYLOADS` decoded pieces per call), so a megabyte prompt costs milliseconds.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass, field

MAX_DEPTH = 3
MAX_PAYLOADS = 32
MIN_B64 = 16
MIN_HEX = 16

_TAGS = {cp: chr(cp - 0xE0000) for cp in range(0xE0020, 0xE007F)}
_INVISIBLE = dict.fromkeys([0xE0001, 0xE007F], None)  # LANGUAGE TAG, CANCEL TAG
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad\u2061\u2062\u2063\u2064"
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
_STRIP = {ord(c): None for c in ZERO_WIDTH + BIDI}
# Cyrillic, Greek and other letters that look like Latin ones (NFKC leaves them alone)
_HOMOGLYPHS = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l", "ɡ": "g", "ɑ": "a", "ο": "o", "α": "a", "β": "b",
    "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "γ": "y",
    "η": "n", "ω": "w", "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o",
    "Р": "p", "С": "c", "Т": "t", "Х": "x", "Ѕ": "s", "І": "i", "Ј": "j", "Α": "a", "Β": "b",
    "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n", "Ο": "o", "Ρ": "p",
    "Τ": "t", "Υ": "y", "Χ": "x", "ı": "i", "ℓ": "l",
})
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4}){4,}(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
                  r"|[A-Za-z0-9_-]{24,}={0,2}")
_HEX = re.compile(r"(?:(?:0x|\\x)?[0-9a-fA-F]{2}[\s,:]?){8,}")
_HEX_START = re.compile(r"[0-9a-fA-F]{2}(?:[\s,:]?(?:0x|\\x)?[0-9a-fA-F]{2}){3}")  # in every _HEX match
_PCT = re.compile(r"(?:%[0-9a-fA-F]{2}[^%\s]{0,3}){3,}")
_HTML = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z]{2,8});")
_WORD = re.compile(r"[a-z]{2,}")
# frequent English words: ROT13 output is kept only when it has clearly more of them
COMMON = frozenset(
    "the be to of and a in that have i it for not on with he as you do at this but his by "
    "from they we say her she or an will my one all would there their what so up out if "
    "about who get which go me when make can like time no just him know take people into "
    "year your good some could them see other than then now look only come its over think "
    "also back after use two how our work first well way even new want because any these "
    "give day most us is are was were ignore previous instructions prompt system say print "
    "tell reveal secret password above all rules now forget".split())


@dataclass
class Views:
    normalized: str
    decoded: list[tuple[str, str]] = field(default_factory=list)  # (how, text)
    signals: set[str] = field(default_factory=set)

    def texts(self) -> list[str]:
        """What to scan: the normalized text, then each decoded payload."""
        return [self.normalized] + [t for _, t in self.decoded]


def normalize(text: str, signals: set[str] | None = None) -> str:
    """NFKC + tag characters to ASCII + invisible characters removed + homoglyphs folded,
    lower-cased, whitespace collapsed (the form every detector sees)."""
    sig = signals if signals is not None else set()
    if _NON_ASCII.search(text):
        if any(0xE0000 <= ord(c) <= 0xE007F for c in text):
            sig.add("tag_chars")
            text = text.translate(_INVISIBLE).translate(_TAGS)
        n = len(text)
        if any(c in BIDI for c in text):
            sig.add("bidi")
        text = text.translate(_STRIP)
        if len(text) < n and "bidi" not in sig:
            sig.add("zero_width")
        text = unicodedata.normalize("NFKC", text)
        folded = text.translate(_HOMOGLYPHS)
        if folded != text and _mixed_script(text):
            sig.add("homoglyph")
        text = folded
    return " ".join(text.split()).lower()  # str.split and re's \s: the same whitespace


def _mixed_script(text: str) -> bool:
    """A word mixing Latin with look-alike letters (plain Greek or Russian text is not a sign)."""
    for w in text.split():
        if len(w) > 2 and any("a" <= c.lower() <= "z" for c in w) and w.translate(_HOMOGLYPHS) != w:
            return True
    return False


def _printable(b: bytes) -> str | None:
    """bytes -> text when they look like human text (UTF-8, mostly printable)."""
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not s:
        return None
    good = sum(c.isprintable() or c in "\n\t\r" for c in s)
    letters = sum(c.isalpha() or c == " " for c in s)
    return s if good >= 0.95 * len(s) and letters >= 0.5 * len(s) else None


def _b64(tok: str) -> str | None:
    t = tok.rstrip("=")
    if len(t) < MIN_B64 or (t.isalpha() and (t.islower() or t.isupper())):
        return None  # a long plain word is not base64
    pad = "=" * (-len(t) % 4)
    try:
        raw = (base64.urlsafe_b64decode(t + pad) if ("-" in t or "_" in t)
               else base64.b64decode(t + pad, validate=True))
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def _hex(tok: str) -> str | None:
    digits = re.sub(r"0x|\\x|[\s,:]", "", tok)
    if len(digits) < MIN_HEX or len(digits) % 2:
        return None
    try:
        return _printable(bytes.fromhex(digits))
    except ValueError:
        return None


_ROT = str.maketrans("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                     "nopqrstuvwxyzabcdefghijklmNOPQRSTUVWXYZABCDEFGHIJKLM")
# ROT13 maps lower-case runs onto lower-case runs at the same places, so the common words of
# the rotated text are the words of the text found in the rotated word list: no second pass
_COMMON_ROT = frozenset(w.translate(_ROT) for w in COMMON)


def _rot13(text: str) -> str | None:
    words = _WORD.findall(text)
    if len(words) < 3:
        return None
    after = sum(map(_COMMON_ROT.__contains__, words))
    if after < 2 or after <= 2 * sum(map(COMMON.__contains__, words)) + 1:
        return None
    return text.translate(_ROT)


def _payloads(raw: str) -> list[tuple[str, str]]:
    """Decoded pieces found in `raw` (one layer)."""
    out: list[tuple[str, str]] = []
    # each decoder runs only where its payload can be: a base64 match holds no whitespace, so
    # it lies inside one whitespace-free word of >= 16 characters (the same matches, in order);
    # hex needs four byte pairs in a row (the first four of its eight)
    for word in raw.split():
        if len(word) < 16:
            continue
        for m in _B64.finditer(word):
            s = _b64(m.group())
            if s is not None:
                out.append(("base64", s))
    if _HEX_START.search(raw):
        for m in _HEX.finditer(raw):
            s = _hex(m.group())
            if s is not None:
                out.append(("hex", s))
    if "%" in raw and _PCT.search(raw):
        s = urllib.parse.unquote(raw)
        if s != raw:
            out.append(("url", s))
    if "&" in raw and _HTML.search(raw):
        s = html.unescape(raw)
        if s != raw:
            out.append(("html", s))
    return out


def views(text: str) -> Views:
    """The normalized text plus every decoded payload, up to MAX_DEPTH layers deep."""
    v = Views(normalized="")
    v.normalized = normalize(text, v.signals)
    frontier = [text]
    for _ in range(MAX_DEPTH):
        nxt: list[str] = []
        for raw in frontier:
            found = _payloads(raw)
            rot = _rot13(raw) if len(raw) <= 200_000 else None
            if rot is not None:
                found.append(("rot13", rot))
            for how, s in found:
                if len(v.decoded) >= MAX_PAYLOADS:
                    return v
                v.signals.add(how)
                v.decoded.append((how, normalize(s, v.signals)))
                nxt.append(s)
        if not nxt:
            break
        frontier = nxt
    return v


def check_text(text: str) -> str | None:
    """Why `text` cannot be scanned or tokenized (a lone UTF-16 surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"invalid Unicode at character {e.start} (lone surrogate {text[e.start]!r})"
    return None
