"""Multiple choice follows lm-eval's definitions; task files are validated; perplexity is right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trustmoe.data.tokenizer import TextCodec
from trustmoe.eval.corpus import load_corpus, read_texts, split_documents
from trustmoe.eval.loglik import loglik
from trustmoe.eval.tasks import (
    Instance,
    Task,
    builtin_tasks,
    encode_pair,
    load_task_file,
    perplexity,
    score_task,
)
from trustmoe.io import TrustmoeError


def test_acc_and_acc_norm_by_definition(tiny_model, lm, enc) -> None:  # type: ignore[no-untyped-def]
    inst = Instance("The dog barked", ["loudly near water", "on", "slowly along the road"], 0)
    res = score_task(lm, Task("t", [inst, inst]))
    # recompute each choice's log-likelihood as log p(context + continuation) - log p(context)
    lls = []
    for ch in inst.choices:
        ctx, cont = encode_pair(enc, inst.context, " " + ch)
        full = loglik(tiny_model, [ctx + cont])[0]
        lls.append(full.logprobs[len(ctx):].sum())
    np.testing.assert_allclose(res.lls[0], lls, atol=1e-4)
    lens = np.array([len(c) for c in inst.choices], dtype=float)
    assert res.metrics["acc"] == float(np.argmax(lls) == 0)
    assert res.metrics["acc_norm"] == float(np.argmax(np.array(lls) / lens) == 0)
    assert res.metrics["n"] == 2 and res.metrics["chance"] == pytest.approx(1 / 3)


def test_encode_pair_moves_trailing_space(enc) -> None:  # type: ignore[no-untyped-def]
    ctx, cont = encode_pair(enc, "The river ", "stone")
    assert ctx == enc("The river")
    assert ctx + cont == enc("The river stone")


def test_builtin_tasks_from_held_out_docs(data_dir: Path, model_dir: Path) -> None:
    corpus = load_corpus(data_dir, TextCodec.from_dir(model_dir), n_train=10, n_val=30)
    tasks = builtin_tasks(corpus, n=12, seed=0)
    assert {t.name for t in tasks} == {"next-line", "next-words"}
    for t in tasks:
        assert 4 <= len(t.instances) <= 12
        for inst in t.instances:
            assert len(inst.choices) == 4 and len(set(inst.choices)) == 4
            assert 0 <= inst.gold < 4
            assert inst.context.strip()
    # deterministic given the seed
    again = builtin_tasks(corpus, n=12, seed=0)
    assert [i.choices for i in again[0].instances] == [i.choices for i in tasks[0].instances]


def test_task_file_validation(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "gold": 1}) + "\n\n")
    assert load_task_file(good).instances[0].gold == 1
    cases = {
        "missing.jsonl": ({"context": "a", "choices": ["b", "c"]}, "missing field"),
        "range.jsonl": ({"context": "a", "choices": ["b", "c"], "gold": 2}, "not an index"),
        "neg.jsonl": ({"context": "a", "choices": ["b", "c"], "gold": -1}, "not an index"),
        "one.jsonl": ({"context": "a", "choices": ["b"], "gold": 0}, "at least 2"),
        "type.jsonl": ({"context": 3, "choices": ["b", "c"], "gold": 0}, "string"),
    }
    for name, (obj, msg) in cases.items():
        p = tmp_path / name
        p.write_text(json.dumps(obj) + "\n")
        with pytest.raises(TrustmoeError, match=msg):
            load_task_file(p)
    (tmp_path / "bad.jsonl").write_text('{"context": \n')
    with pytest.raises(TrustmoeError, match=r"bad.jsonl:1: malformed JSON"):
        load_task_file(tmp_path / "bad.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TrustmoeError, match="UTF-8"):
        load_task_file(tmp_path / "bin.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrustmoeError, match="no instances"):
        load_task_file(tmp_path / "empty.jsonl")
    with pytest.raises(TrustmoeError, match="not found"):
        load_task_file(tmp_path / "nope.jsonl")


def test_perplexity_and_bits_per_byte(tiny_model, tokenizer, corpus_docs) -> None:  # type: ignore[no-untyped-def]
    texts = corpus_docs["val"][:4]
    scored = loglik(tiny_model, texts, tokenizer)
    out = perplexity(scored, texts)
    nll = -sum(float(s.logprobs.sum()) for s in scored)
    n_tok = sum(len(tokenizer.encode(t).ids) for t in texts)
    assert out["tokens"] == n_tok
    assert out["perplexity"] == pytest.approx(math.exp(nll / n_tok))
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(t) for t in texts))
    # an untrained model is close to uniform over 512 tokens
    assert 200 < out["perplexity"] < 1000


def test_split_documents_and_ood_readers(tmp_path: Path) -> None:
    docs = split_documents(np.array([0, 5, 6, 0, 0, 7, 0, 8, 9, 10]), 0)
    assert [d.tolist() for d in docs] == [[5, 6], [8, 9, 10]]
    (tmp_path / "a.txt").write_text("one doc\nline two\n\nsecond doc\n\n\n")
    assert read_texts(tmp_path / "a.txt") == ["one doc\nline two", "second doc"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n{"text": "z"}\n')
    assert read_texts(tmp_path / "b.jsonl") == ["x y", "z"]
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(TrustmoeError, match="empty"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(TrustmoeError, match="text"):
        read_texts(tmp_path / "c.jsonl")
    with pytest.raises(TrustmoeError, match="not found"):
        read_texts(tmp_path / "missing")
