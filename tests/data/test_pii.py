"""PII and secrets: each type found with its exact span, checksums enforced, values masked."""

from __future__ import annotations

import itertools
import random

import pytest

from trustmoe.data import pii


def _types(text: str) -> list[tuple[str, str]]:
    return [(f.type, text[f.start : f.end]) for f in pii.find(text)]


@pytest.mark.parametrize(("text", "expected"), [
    ("mail jane.doe+x@mail.example.co.uk now", ("EMAIL", "jane.doe+x@mail.example.co.uk")),
    ("server at 10.1.2.3, ok", ("IP_ADDRESS", "10.1.2.3")),
    ("v6 2a00:1450:4001:82b::200e here", ("IP_ADDRESS", "2a00:1450:4001:82b::200e")),
    ("call +44 20 7946 0958.", ("PHONE", "+44 20 7946 0958")),
    ("call (415) 555-0132 today", ("PHONE", "(415) 555-0132")),
    ("pay 4539 1488 0343 6467 now", ("CREDIT_CARD", "4539 1488 0343 6467")),
    ("iban DE89 3704 0044 0532 0130 00.", ("IBAN", "DE89 3704 0044 0532 0130 00")),
    ("key = 'AKIAIOSFODNN7EXAMPLE'", ("KEY", "AKIAIOSFODNN7EXAMPLE")),
    ("token ghp_" + "a1B2" * 9 + " end", ("KEY", "ghp_" + "a1B2" * 9)),
])
def test_each_type_found_with_exact_span(text: str, expected: tuple[str, str]) -> None:
    assert _types(text) == [expected]


@pytest.mark.parametrize("text", [
    "pay 4539 1488 0343 6468 now",  # fails Luhn
    "iban DE88 3704 0044 0532 0130 00.",  # fails mod-97
    "version 1.2.3.4.5 and 256.1.1.1",  # not an address
    "docs use 192.0.2.1 and 127.0.0.1 and 2001:db8::1",  # documentation / loopback
    "x = data[::2] + a:b:c",  # slices are not IPv6
    "date 2024-01-15 and 12:30:45",
    "sha = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
])
def test_non_pii_is_not_flagged(text: str) -> None:
    assert _types(text) == []


def test_private_key_block_is_one_finding() -> None:
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\nabc\n-----END RSA PRIVATE KEY-----"
    text = f"x = '''{pem}'''"
    assert _types(text) == [("KEY", pem)]
    assert pii.redact(text, pii.find(text)) == "x = '''<KEY>'''"


def test_luhn_matches_reference_on_random_numbers() -> None:
    def reference(num: str) -> bool:  # textbook: double every second digit from the right
        digits = [int(c) for c in num][::-1]
        total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
        return total % 10 == 0

    rng = random.Random(0)
    for _ in range(2000):
        num = "".join(rng.choice("0123456789") for _ in range(rng.randint(13, 19)))
        assert pii.luhn_ok(num) == reference(num)


def test_redact_uses_typed_placeholders_and_mask_hides_values() -> None:
    text = "a@b.example.com 10.0.0.7 +1 415 555 0132 4111111111111111"
    fs = pii.find(text)
    assert pii.redact(text, fs) == "<EMAIL> <IP_ADDRESS> <PHONE> <CREDIT_CARD>"
    for f in fs:
        assert f.masked() != f.value and len(f.masked()) == len(f.value)
        assert f.masked().count("*") >= len(f.value) - 4


def test_overlaps_resolve_to_one_finding() -> None:
    text = "https://user:s3cretpassw0rd@10.1.2.3/path"
    fs = pii.find(text)
    spans = [(f.start, f.end) for f in fs]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert {f.type for f in fs} == {"KEY", "IP_ADDRESS"}
