"""Contamination of evaluated items, and verbatim extraction of training documents."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from trustmoe.data.shards import write_shard
from trustmoe.data.tokenizer import load_tokenizer, save_tokenizer
from trustmoe.eval import contamination as con
from trustmoe.eval.backend_model import ModelLM
from trustmoe.eval.extraction import extraction, split_extraction
from trustmoe.eval.lm import GenerateRequest, Generation
from trustmoe.eval.tasks import Instance, Task


def _dataset(tmp: Path, data_dir: Path, train_docs: list[str]) -> Path:
    tok = load_tokenizer(data_dir)
    save_tokenizer(tok, tmp)
    for split, docs in (("train", train_docs), ("val", train_docs[:1])):
        ids = [i for d in docs for i in [*tok.encode(d).ids, 0]]
        write_shard(tmp / f"{split}.bin", np.array(ids), 512)
    return tmp


def test_items_found_in_training_documents(tmp_path: Path, data_dir: Path, corpus_docs,  # type: ignore[no-untyped-def]
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    train = corpus_docs["train"][:20]
    leaked = train[7].split("\n")
    clean = Instance("Zebra quantum marmalade orbits", ["a b c d e f g h", "x"], 0)
    tasks = [Task("t", [Instance(leaked[0], [leaked[1], "no"], 0), clean,
                        Instance("short", ["one", "two"], 0)])]
    d = _dataset(tmp_path / "ds", data_dir, train)
    monkeypatch.setattr(con, "BATCH_TOKENS", 97)  # many batches: no document may be split
    res = con.task_contamination(tasks, d)
    assert res["train_documents_scanned"] == 20
    assert res["hits"] == 1 and res["hits_by_task"] == {"t": 1}
    assert res["examples"][0]["item"] == 1 and res["examples"][0]["train_document"] == 7
    assert res["items"] == 3 and res["items_too_short"] == 1
    assert res["dataset_audit_hits"] is None
    (d / "audit.json").write_text(json.dumps({"contamination": [{"item": 1}, {"item": 4}]}))
    assert con.task_contamination(tasks, d)["dataset_audit_hits"] == 2


class Parrot(ModelLM):
    """The torch backend, except that it recites the documents it memorised."""

    def __init__(self, base: ModelLM, memorised: Sequence[list[int]]) -> None:
        super().__init__(base.model, base.codec)
        self.memorised = memorised

    def generate_until(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        out = []
        for r in requests:
            doc = next((d for d in self.memorised if d[:len(r.context)] == r.context), None)
            ids = doc[len(r.context):len(r.context) + r.max_tokens] if doc else [5] * r.max_tokens
            out.append(Generation(self.codec.decode(ids), ids, "length"))  # type: ignore[union-attr]
        return out


def test_extraction_separates_memorised_documents(lm, enc, corpus_docs) -> None:  # type: ignore[no-untyped-def]
    train = [enc(t) for t in corpus_docs["train"][:6]]
    val = [enc(t) for t in corpus_docs["val"][:6]]
    res = extraction(Parrot(lm, train), train, val, n=6, prefix_tokens=16, suffix_tokens=8)
    assert res["members"]["exact_match_rate"] == 1.0 and res["members"]["n"] == 6
    assert res["nonmembers"]["exact_match_rate"] == 0.0
    assert res["exact_match_gap"] == 1.0 and res["members"]["matched_fraction"] == 1.0
    # the real (untrained) model through the engine's sampler: valid rates, nothing recited
    real = split_extraction(lm, train, 16, 8)
    assert real["n"] == 6 and 0.0 <= real["matched_fraction"] < 1.0
    assert split_extraction(lm, [[5, 6]], 16, 8)["n"] == 0  # too short to ask


def test_builtin_items_found_in_training_are_dropped_not_scored() -> None:
    from trustmoe.eval.runner import _drop_contaminated
    from trustmoe.eval.tasks import Instance, Task

    def inst(k: int) -> Instance:
        return Instance(context=f"c{k}", choices=["a", "b"], gold=0, delimiter=" ")

    builtin = [Task("next-line", [inst(i) for i in range(4)]), Task("next-words", [inst(9), inst(8)])]
    report = {"hits": 4, "hits_by_task": {"next-line": 2, "next-words": 1, "mine": 1},
              "hit_items": [["next-line", 1], ["next-line", 3], ["next-words", 2], ["mine", 1]]}
    kept = _drop_contaminated(builtin, report)
    assert [t.name for t in kept] == ["next-line"]  # next-words keeps 1 item: too few, dropped
    assert [i.context for i in kept[0].instances] == ["c1", "c3"]  # items 1 and 3 (1-based) gone
    assert report["builtin_items_dropped"] == 3 and report["hits"] == 1  # the user task's stays
    assert report["hits_by_task"] == {"next-line": 0, "next-words": 0, "mine": 1}
