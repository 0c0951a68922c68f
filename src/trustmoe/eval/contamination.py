"""Contamination of what was evaluated: task items whose text occurs in the training data.

Every evaluated multiple-choice item (context + delimiter + gold choice, as the model scored
it) is indexed by its word 13-grams (`trustmoe.data.contamination.NgramIndex`, the rule
`trustmoe data build --eval-set` applies), and every document of the dataset's training split
is looked up in that index. An item is a *hit* when any of its n-grams occurs in a training
document (an item shorter than n words, but of at least 8, counts as one n-gram of its own
length). The dataset's own audit (`audit.json`, eval sets declared at build time) is reported
beside it, so the registry's gate can read one number: `summary.contamination_hits`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustmoe.eval.tasks import Task
from trustmoe.io import TrustmoeError, read_json

BATCH_TOKENS = 1 << 20  # decode training documents about a million tokens at a time


def _train_texts(data_dir: Path) -> Iterator[tuple[int, str]]:
    from trustmoe.data.shards import open_tokens
    from trustmoe.data.tokenizer import eos_id, load_tokenizer
    from trustmoe.eval.corpus import split_documents

    tok = load_tokenizer(data_dir)
    tokens = open_tokens(data_dir, "train")
    eos = eos_id(tok)
    doc, a, n = 0, 0, len(tokens)
    while a < n:
        b = min(a + BATCH_TOKENS, n)
        if b < n:  # cut after the batch's last EOS so no document is split across batches
            cuts = np.flatnonzero(np.asarray(tokens[a:b]) == eos)
            if len(cuts):
                b = a + int(cuts[-1]) + 1
        docs = split_documents(np.asarray(tokens[a:b]), eos, min_len=1)
        for t in tok.decode_batch([d.astype(np.int64).tolist() for d in docs]):
            yield doc, t
            doc += 1
        a = b


def task_contamination(tasks: Sequence[Task], data_dir: Path, *, ngram: int = 13,
                       min_words: int = 8) -> dict[str, Any]:
    """Hits of evaluated task items in the training split, plus the dataset audit's count."""
    from trustmoe.data.contamination import EvalItem, NgramIndex
    from trustmoe.data.text import WordHasher

    items = [EvalItem(t.name, i + 1, inst.context + inst.delimiter + inst.choices[inst.gold])
             for t in tasks for i, inst in enumerate(t.instances)]
    index = NgramIndex(n=ngram, min_words=min_words).build(items)
    hasher = WordHasher()
    hit: dict[int, int] = {}  # item index -> first training document holding it
    n_docs = 0
    if index.items:
        for doc, text in _train_texts(data_dir):
            n_docs += 1
            for item in index.lookup(hasher.text(text)):
                hit.setdefault(item, doc)
    else:
        n_docs = sum(1 for _ in _train_texts(data_dir))
    by_task: dict[str, int] = {t.name: 0 for t in tasks}
    for item in hit:
        by_task[index.items[item].eval_set] += 1
    return {
        "ngram": ngram, "items": len(items), "items_indexed": len(index.items),
        "items_too_short": len(index.skipped), "train_documents_scanned": n_docs,
        "hits": len(hit), "hits_by_task": by_task,
        "hit_items": [[index.items[i].eval_set, index.items[i].item] for i in sorted(hit)],
        "examples": [{"task": index.items[i].eval_set, "item": index.items[i].item,
                      "preview": index.items[i].text[:80], "train_document": d}
                     for i, d in sorted(hit.items())[:10]],
        "dataset_audit_hits": dataset_audit_hits(data_dir),
    }


def dataset_audit_hits(data_dir: Path) -> int | None:
    """Eval-set items `trustmoe data build` found in kept documents (None: no audit.json)."""
    p = Path(data_dir) / "audit.json"
    if not p.exists():
        return None
    audit = read_json(p, "audit.json")
    found = audit.get("contamination") if isinstance(audit, dict) else None
    if found is not None and not isinstance(found, list):
        raise TrustmoeError(f"{p}: contamination must be a list")
    return len(found or [])
