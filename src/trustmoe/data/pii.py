"""PII and secrets for the data stage: the detectors live in `trustmoe.security.detectors`
(the server's output guard uses the same ones), re-exported here for the data pipeline."""

from __future__ import annotations

from trustmoe.security.detectors import (
    PLACEHOLDERS,
    TYPE_MEANING,
    Finding,
    find,
    iban_ok,
    luhn_ok,
    mask,
    redact,
)

__all__ = ["PLACEHOLDERS", "TYPE_MEANING", "Finding", "find", "iban_ok", "luhn_ok", "mask", "redact"]
