"""Fixtures for the data-governance tests (helpers live in data_corpus.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_corpus import write_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write_corpus(root)
    return root


@pytest.fixture
def eval_set(tmp_path: Path, corpus: Path) -> Path:
    """Two eval items: one copied from doc007 (contaminated), one unseen."""
    doc = (corpus / "docs/doc007.txt").read_text().split()
    items = [{"text": " ".join(doc[20:45])}, {"text": "an unseen item " * 6}]
    p = tmp_path / "eval.jsonl"
    p.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return p
