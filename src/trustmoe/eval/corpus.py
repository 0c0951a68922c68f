"""Evaluation inputs: documents from a dataset dir, and text sets given with `--ood`.

A dataset dir's shards hold documents separated by its tokenizer's EOS id. Documents are
sampled deterministically from a seed. When the dataset's tokenizer differs from the model's,
texts are decoded with the dataset's tokenizer and re-encoded with the model's `TextCodec`.
Documents are held without BOS: every request puts the model's BOS in front.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.data.tokenizer import TextCodec


@dataclass
class Corpus:
    codec: TextCodec  # the model's
    train: list[list[int]] = field(default_factory=list)  # sampled training documents
    val: list[list[int]] = field(default_factory=list)  # sampled held-out documents

    def text(self, ids: list[int]) -> str:
        return self.codec.decode(list(ids))

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text, add_bos=False)


def split_documents(tokens: np.ndarray, eos: int, min_len: int = 2) -> list[np.ndarray]:
    """Cut a flat token array at every EOS; keep documents with at least `min_len` tokens."""
    cuts = np.flatnonzero(np.asarray(tokens) == eos)
    docs, start = [], 0
    for c in [*cuts.tolist(), len(tokens)]:
        if c - start >= min_len:
            docs.append(np.asarray(tokens[start:c]))
        start = c + 1
    return docs


def sample(docs: list[np.ndarray], n: int | None, seed: int, max_tokens: int) -> list[list[int]]:
    """Up to n documents in a seed-determined order, each cut to max_tokens."""
    if n is not None and n < len(docs):
        pick = np.random.default_rng(seed).choice(len(docs), size=n, replace=False)
        docs = [docs[i] for i in sorted(pick.tolist())]
    return [d[:max_tokens].astype(np.int64).tolist() for d in docs]


def load_corpus(
    data_dir: Path, codec: TextCodec, *, n_train: int | None, n_val: int | None,
    seed: int = 0, max_tokens: int = 512,
) -> Corpus:
    from trustmoe.data.shards import open_tokens
    from trustmoe.data.tokenizer import eos_id, load_tokenizer

    data_tok = load_tokenizer(data_dir)
    eos = eos_id(data_tok)
    same = data_tok.to_str() == codec.tokenizer.to_str()
    corpus = Corpus(codec=codec)
    for split, n, off in (("val", n_val, 1), ("train", n_train, 2)):
        if n == 0:
            continue
        docs = split_documents(open_tokens(data_dir, split), eos)
        if not docs:
            raise TrustmoeError(f"{data_dir / (split + '.bin')} holds no documents")
        picked = sample(docs, n, seed * 7919 + off, 10 * max_tokens if not same else max_tokens)
        if not same:
            picked = [codec.encode(data_tok.decode(d), add_bos=False)[:max_tokens]
                      for d in picked]
        setattr(corpus, split, [d for d in picked if len(d) >= 2])
    return corpus


def read_texts(path: Path) -> list[str]:
    """Documents from a `--ood` argument.

    A `.jsonl` file: one object per line with a "text" field. Any other file: UTF-8 text with
    documents separated by blank lines. A dataset dir (has val.bin): its held-out documents.
    A directory of `.txt`/`.jsonl` files: each file read as above.
    """
    if not path.exists():
        raise TrustmoeError(f"OOD set not found: {path}")
    if path.is_dir():
        if (path / "val.bin").exists():
            from trustmoe.data.shards import open_tokens
            from trustmoe.data.tokenizer import eos_id, load_tokenizer

            tok = load_tokenizer(path)
            docs = split_documents(open_tokens(path, "val"), eos_id(tok))
            texts = [tok.decode(d.astype(np.int64).tolist()) for d in docs]
        else:
            files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl", ".md"))
            texts = [t for f in files for t in read_texts(f)]
    elif path.suffix == ".jsonl":
        texts = _read_jsonl_texts(path)
    else:
        texts = [d.strip() for d in _read_utf8(path).split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TrustmoeError(f"OOD set {path} is empty: it holds no documents")
    return texts


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrustmoeError(f"{path} is not valid UTF-8 (byte {e.start})") from None


def iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of `text`, read from JSONL `path`."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrustmoeError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        yield n, obj


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    for n, obj in iter_jsonl(path, _read_utf8(path)):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise TrustmoeError(f"{path}:{n}: expected an object with a string \"text\" field")
        texts.append(obj["text"])
    return texts
