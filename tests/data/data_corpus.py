"""Helpers for the data-governance tests: a small, fully known corpus on disk."""

from __future__ import annotations

import random
from pathlib import Path

from trustmoe.data.build import BuildOptions

VOCAB = (
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain cloud "
    "stone forest window garden bridge lantern copper silver marble harbor meadow orchard "
    "falcon badger otter heron walnut cedar maple willow amber cobalt indigo scarlet violet "
    "quartz basalt granite pebble canyon valley summit glacier tundra prairie desert oasis"
).split()


def random_doc(rng: random.Random, n_words: int = 120) -> str:
    lines = []
    words = [rng.choice(VOCAB) for _ in range(n_words)]
    for i in range(0, n_words, 12):
        lines.append(" ".join(words[i : i + 12]) + ".")
    return "\n".join(lines) + "\n"


def write_corpus(root: Path, n: int = 30, seed: int = 0) -> dict[str, str]:
    """n unrelated docs + planted cases; returns {relative path: text} of the text files."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for i in range(n):
        files[f"docs/doc{i:03d}.txt"] = random_doc(rng)
    base = files["docs/doc000.txt"]
    files["z_copies/exact_copy.txt"] = base.upper()  # same after normalisation
    words = base.split(" ")
    words[5] = "zzznear"
    files["z_copies/near_copy.txt"] = " ".join(words)  # one word changed: near duplicate
    files["pii/contact.txt"] = (
        random_doc(rng, 40) + "Write to jane.doe@example.org or call +1 415 555 0132.\n"
        "Card 4111 1111 1111 1111, IBAN GB82 WEST 1234 5698 7654 32, host 8.8.4.4.\n"
        "aws_key = AKIAIOSFODNN7EXAMPLE\n"
    )
    files["short.txt"] = "tiny"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    return files


def small_options(**kw: object) -> BuildOptions:
    return BuildOptions(**({"vocab_size": 300} | kw))  # type: ignore[arg-type]
