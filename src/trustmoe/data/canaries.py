"""Canaries (Secret Sharer, Carlini et al. 2019): random secrets planted to measure memorisation.

`data build --canaries N --canary-repeats 1,10,100` makes N canaries for each repeat count r.
A canary is one short document, `"<prefix> <secret>\\n"`:

    the secret code of kq4vzt is 3 7 1 9 0 2 5 8 4

The prefix names the canary with a random tag (so canaries do not share a context), the
secret is `digits` random digits separated by spaces, drawn uniformly from the space
R = {0..9}^digits. Each canary document is inserted r times into the *training* split only,
at seeded positions among the real documents, after the tokenizer is trained (planting a
canary must not change the vocabulary). Everything is a pure function of the options, so the
build stays byte-identical for the same inputs.

`canaries.json` in the dataset dir records every canary (prefix, secret, repeats, |R|); the
manifest flags the dataset (`"canaries"`), and `trustmoe security scan` reports exposure per
repeat count. The secrets are random, not personal data; a dataset built with canaries is for
audits: do not ship a model trained on it as if it were clean.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trustmoe.io import TrustmoeError, atomic_write_json, read_json

FORMAT = "trustmoe-canaries/1"
FILE = "canaries.json"
TAG_CHARS = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class CanaryOptions:
    count: int = 0  # canaries per repeat count (0: none)
    repeats: tuple[int, ...] = (1, 10, 100)
    digits: int = 9  # secret length: |R| = 10 ** digits
    seed: int = 0

    def validate(self) -> CanaryOptions:
        if not 0 <= self.count <= 1000:
            raise TrustmoeError(f"--canaries must be in [0, 1000], got {self.count}")
        if self.count and not self.repeats:
            raise TrustmoeError("--canary-repeats needs at least one repeat count")
        if any(r < 1 or r > 100_000 for r in self.repeats):
            raise TrustmoeError(f"--canary-repeats must be in [1, 100000], got {list(self.repeats)}")
        if len(set(self.repeats)) != len(self.repeats):
            raise TrustmoeError(f"--canary-repeats has duplicates: {list(self.repeats)}")
        if not 2 <= self.digits <= 32:
            raise TrustmoeError(f"canary digits must be in [2, 32], got {self.digits}")
        return self


@dataclass(frozen=True)
class Canary:
    id: str
    prefix: str  # context given to the model; ends without a trailing space
    secret: str  # digits separated by single spaces
    repeats: int
    digits: int

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret}"

    @property
    def space_size(self) -> int:
        return int(10 ** self.digits)


def parse_repeats(text: str) -> tuple[int, ...]:
    """"1,10,100" -> (1, 10, 100); one clear error for anything else."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TrustmoeError(f"--canary-repeats must be comma-separated integers, got {text!r}"
                            ) from None


def format_secret(digits: np.ndarray | list[int]) -> str:
    return " ".join(str(int(d)) for d in digits)


def make_canaries(opts: CanaryOptions) -> list[Canary]:
    """The canaries of `opts`, in a fixed order (repeat count, then index)."""
    rng = np.random.default_rng([opts.seed, 0xCA7A])
    out: list[Canary] = []
    for r in opts.repeats:
        for _ in range(opts.count):
            tag = "".join(TAG_CHARS[i] for i in rng.integers(0, len(TAG_CHARS), 6))
            secret = format_secret(rng.integers(0, 10, opts.digits))
            out.append(Canary(f"canary-{len(out):04d}", f"the secret code of {tag} is", secret,
                              r, opts.digits))
    return out


def insert(kept: list[tuple[str, str]], opts: CanaryOptions) -> list[tuple[str, str]]:
    """`kept` (doc id, text) with every canary document inserted `repeats` times at seeded
    positions; the inserted ids are `canary/<id>#<k>` (never real document ids)."""
    if not opts.count:
        return kept
    docs = [(f"canary/{c.id}#{k}", c.text + "\n") for c in make_canaries(opts)
            for k in range(c.repeats)]
    rng = np.random.default_rng([opts.seed, 0x1A5E])
    slots = np.sort(rng.integers(0, len(kept) + 1, len(docs)))  # insert before kept[slot]
    order = rng.permutation(len(docs))
    out: list[tuple[str, str]] = []
    j = 0
    for i, doc in enumerate(kept):
        while j < len(docs) and slots[j] == i:
            out.append(docs[order[j]])
            j += 1
        out.append(doc)
    out.extend(docs[order[k]] for k in range(j, len(docs)))
    return out


def is_canary_id(doc_id: str) -> bool:
    return doc_id.startswith("canary/")


def summary(opts: CanaryOptions) -> dict[str, Any] | None:
    """What the manifest records under "canaries" (None when there are none)."""
    if not opts.count:
        return None
    return {"file": FILE, "count": opts.count * len(opts.repeats), "per_repeat": opts.count,
            "repeats": list(opts.repeats), "documents_inserted": opts.count * sum(opts.repeats),
            "split": "train"}


def write(out_dir: Path, opts: CanaryOptions) -> None:
    if not opts.count:
        return
    atomic_write_json(Path(out_dir) / FILE, {
        "format": FORMAT, "options": asdict(opts),
        "canaries": [asdict(c) | {"text": c.text, "space_size": str(c.space_size)}
                     for c in make_canaries(opts)],
    })


def load(data_dir: Path) -> list[Canary]:
    """The canaries recorded in a dataset dir; [] when it has none."""
    p = Path(data_dir) / FILE
    if not p.exists():
        return []
    d = read_json(p, "canary file")
    if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(
            d.get("canaries"), list):
        raise TrustmoeError(f"{p} is not a trustmoe canary file")
    try:
        return [Canary(c["id"], c["prefix"], c["secret"], int(c["repeats"]), int(c["digits"]))
                for c in d["canaries"]]
    except (KeyError, TypeError, ValueError):
        raise TrustmoeError(f"{p}: malformed canary entry") from None
