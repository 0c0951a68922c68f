"""PII and secrets: find, mask for the audit, and redact with typed placeholders.

Types and how each is confirmed (a bare regex hit is not enough where a checksum exists):
- `EMAIL`: local@domain.tld.
- `IP_ADDRESS`: IPv4 dotted quads (each octet ≤ 255, not part of a longer dotted number) and
  IPv6 addresses, both parsed with `ipaddress`; loopback, unspecified, reserved, multicast,
  documentation ranges (192.0.2.0/24, 2001:db8::/32, ...) and netmasks are not personal.
- `PHONE`: international (+CC) or separated 3-3-4 style numbers with 7–15 digits.
- `CREDIT_CARD`: 13–19 digits (spaces/dashes allowed) that pass the Luhn check.
- `IBAN`: country code + check digits + BBAN that pass the ISO 7064 mod-97 check.
- `KEY`: PEM private-key blocks, and every regex detector of `detect-secrets` (AWS, GitHub,
  GitLab, Slack, Stripe, OpenAI, PyPI, npm, JWT, Basic-auth URLs, ...). Its entropy and
  keyword detectors are not used: on source code they flag hashes and test vectors.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

PLACEHOLDERS = {
    "EMAIL": "<EMAIL>", "IP_ADDRESS": "<IP_ADDRESS>", "PHONE": "<PHONE>",
    "CREDIT_CARD": "<CREDIT_CARD>", "IBAN": "<IBAN>", "KEY": "<KEY>",
}
# What each type is, in words for the audit report (`data/explain.py`, audit.html).
TYPE_MEANING = {
    "EMAIL": "an e-mail address (in source code, usually an author's or maintainer's contact)",
    "IP_ADDRESS": "an IPv4/IPv6 address that could name a real host (loopback, reserved, "
                  "multicast and documentation ranges, and netmasks, are not counted)",
    "PHONE": "a telephone number (international +CC form or 3-3-4 digits)",
    "CREDIT_CARD": "a payment card number (13-19 digits passing the Luhn checksum)",
    "IBAN": "a bank account number (IBAN passing its mod-97 checksum)",
    "KEY": "a secret: a private key block or an API token of a known format (AWS, GitHub, "
           "Slack, Stripe, OpenAI, JWT, ...); treat it as leaked and revoke it",
}
_PRIORITY = {"KEY": 0, "EMAIL": 1, "CREDIT_CARD": 2, "IBAN": 3, "IP_ADDRESS": 4, "PHONE": 5}

# Each pattern starts with a selective character class so `re` can skip ahead quickly; the
# context checks a look-behind would do are made in Python on the (few) candidates.
_EMAIL_DOMAIN = re.compile(r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})\b")
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{1,4}:")
_IPV6 = re.compile(r"[0-9A-Fa-f]{0,4}:(?:[0-9A-Fa-f]{0,4}:){1,6}[0-9A-Fa-f]{0,4}")
_PHONE = re.compile(r"(?:\+(?<![\w+.\-]\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}"
                    r"(?:[ .-]\d{2,4}){1,4}"
                    r"|\((?<![\w+.\-]\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
                    r"|\d(?<![\w+.\-]\d)\d{2}[.-]\d{3}[.-]\d{4})(?![\w-]|\.\d)")
_CARD = re.compile(r"\d(?<![\w+.\-]\d)(?:[ -]?\d){12,18}(?![\w-])")
_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?")
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----.*?-----END [A-Z0-9 ]*PRIVATE "
                  r"KEY( BLOCK)?-----", re.S)
_TOKEN = re.compile(r"[A-Za-z0-9_+/=-]{20,}")
_WORDISH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass(frozen=True)
class Finding:
    type: str
    start: int
    end: int
    value: str

    def masked(self) -> str:
        return mask(self.value)


def mask(value: str) -> str:
    """Keep at most the first two and last two characters; never the whole value."""
    if len(value) <= 6:
        return "*" * len(value)
    keep = 2 if len(value) >= 10 else 1
    return value[:keep] + "*" * (len(value) - 2 * keep) + value[-keep:]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    num = "".join(str(int(c, 36)) for c in moved)
    return int(num) % 97 == 1


@lru_cache(maxsize=1)
def _secret_regexes() -> tuple[re.Pattern[str], ...]:
    """Every denylist regex of detect-secrets' regex-based plugins (not the public-IP one)."""
    # a base dependency: without it the screen would silently miss every API key, so a
    # broken install fails loudly (the CLI prints one line naming the missing module)
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins.base import RegexBasedDetector

    out: list[re.Pattern[str]] = []
    cls: type
    for name, cls in sorted(get_mapping_from_secret_type_to_class().items()):
        skip = "IP" in name or cls.__name__ == "PrivateKeyDetector"  # handled above, better
        if issubclass(cls, RegexBasedDetector) and not skip:
            out.extend(getattr(cls, "denylist", ()))
    return tuple(out)


def _secret_lines(text: str) -> list[tuple[int, int]]:
    """Spans of the lines that may hold a secret: a long token with a digit (or a long
    underscore-free one), or a URL with credentials. Only these go through detect-secrets."""
    spans: list[tuple[int, int]] = []
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if not (any(c.isdigit() for c in tok) or ("_" not in tok and len(tok) >= 24)):
            continue
        s = text.rfind("\n", 0, m.start()) + 1
        if spans and s < spans[-1][1]:
            continue
        e = text.find("\n", m.end())
        spans.append((s, len(text) if e < 0 else e))
    start = 0
    while (i := text.find("://", start)) >= 0:
        s, e = text.rfind("\n", 0, i) + 1, text.find("\n", i)
        e = len(text) if e < 0 else e
        if "@" in text[i:e]:
            spans.append((s, e))
        start = e
    return sorted(set(spans))


def _keys(text: str) -> list[Finding]:
    found = [Finding("KEY", m.start(), m.end(), m.group()) for m in _PEM.finditer(text)]
    regexes = _secret_regexes()
    for s, e in _secret_lines(text) if regexes else []:
        line = text[s:e]
        for rx in regexes:
            for m in rx.finditer(line):
                # the secret is the longest capture group (some groups only hold a prefix
                # such as "ghp"), or the whole match when no group is long enough
                spans = [m.span(i) for i in range(1, (rx.groups or 0) + 1) if m.group(i)]
                a, b = max(spans, key=lambda sp: sp[1] - sp[0], default=m.span())
                if b - a < 8:
                    a, b = m.span()
                if b - a >= 8:
                    found.append(Finding("KEY", s + a, s + b, line[a:b]))
    return found


def _before(text: str, i: int) -> str:
    return text[i - 1] if i > 0 else ""


def _after(text: str, i: int) -> str:
    return text[i] if i < len(text) else ""


def _emails(text: str) -> list[Finding]:
    out = []
    for m in _EMAIL_DOMAIN.finditer(text):
        i = m.start()
        j = i
        while j > 0 and i - j < 64 and text[j - 1] in _EMAIL_LOCAL:
            j -= 1
        while j < i and not text[j].isalnum():
            j += 1
        if j < i:
            out.append(Finding("EMAIL", j, m.end(), text[j : m.end()]))
    return out


def find(text: str) -> list[Finding]:
    """Non-overlapping findings sorted by position (higher-priority type wins an overlap)."""
    cands = _keys(text)
    if "@" in text:
        cands += _emails(text)
    for m in _IPV4.finditer(text):
        v = m.group()
        if all(int(p) <= 255 for p in v.split(".")) and _is_ip(v):
            cands.append(Finding("IP_ADDRESS", *m.span(), v))
    if _IPV6_HINT.search(text):
        for m in _IPV6.finditer(text):
            v, (s, e) = m.group(), m.span()
            if (v.count(":") >= 3 and _is_ip(v)
                    and _before(text, s) not in _WORDISH and _after(text, e) not in _WORDISH):
                cands.append(Finding("IP_ADDRESS", s, e, v))
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits):
            cands.append(Finding("CREDIT_CARD", *m.span(), m.group()))
    for m in _IBAN.finditer(text):
        s, e = m.span()
        if _before(text, s) not in _WORDISH and _after(text, e) not in _WORDISH and iban_ok(
                m.group()):
            cands.append(Finding("IBAN", s, e, m.group()))
    for m in _PHONE.finditer(text):
        if 7 <= sum(c.isdigit() for c in m.group()) <= 15:
            cands.append(Finding("PHONE", *m.span(), m.group()))
    cands.sort(key=lambda f: (f.start, _PRIORITY[f.type], -f.end))
    out: list[Finding] = []
    for f in cands:
        if out and f.start < out[-1].end:
            continue
        out.append(f)
    return out


_DOC_NETS = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))
_MASK_OCTETS = frozenset({"0", "128", "192", "224", "240", "248", "252", "254", "255"})


def _is_ip(v: str) -> bool:
    """A parseable address that could identify a host: not loopback, unspecified, reserved,
    multicast, a documentation range (RFC 5737/3849) or a netmask."""
    try:
        ip = ipaddress.ip_address(v)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified or ip.is_reserved or ip.is_multicast:
        return False
    if any(ip in net for net in _DOC_NETS if net.version == ip.version):
        return False
    return not (ip.version == 4 and v.startswith("255.") and set(v.split(".")) <= _MASK_OCTETS)


def redact(text: str, findings: list[Finding]) -> str:
    """Replace each finding's span with its typed placeholder."""
    parts, last = [], 0
    for f in findings:
        parts.append(text[last : f.start])
        parts.append(PLACEHOLDERS[f.type])
        last = f.end
    parts.append(text[last:])
    return "".join(parts)
