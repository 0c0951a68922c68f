"""The JSON automaton against Python's `json` as the oracle, and the token mask it builds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmoe.data.tokenizer import load_tokenizer
from trustmoe.serve.jsonmode import (
    JSONLogitsProcessor,
    SchemaError,
    advance,
    compile_schema,
    initial_state,
    is_complete,
)
from trustmoe.serve.vocab import TokenTrie

scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
           | st.floats(allow_nan=False, allow_infinity=False, width=32) | st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)


def accepts(root: Any, data: bytes) -> bool:
    s = advance(initial_state(root), data)
    return bool(s) and is_complete(s)


def _dump(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=5), values, max_size=5))
def test_accepts_every_compact_json_object(obj: dict[str, Any]) -> None:
    data = _dump(obj)
    if any(len(run) > 15 for run in re.findall(rb"[0-9]+", data)):  # long numbers are capped
        return
    assert accepts(compile_schema(None), data)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=3), values, max_size=3), st.integers(0, 200),
       st.sampled_from(list(b'{}[]",:0123456789.eE+-tfnaulrs\\ ')))
def test_never_accepts_invalid_json(obj: dict[str, Any], pos: int, byte: int) -> None:
    """Mutate valid JSON at random: whatever the automaton accepts, json.loads must parse."""
    data = bytearray(_dump(obj))
    data.insert(pos % (len(data) + 1), byte)
    if accepts(compile_schema(None), bytes(data)):
        assert isinstance(json.loads(bytes(data)), dict)


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "score": {"type": "number"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
    "kind": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/k"}]}},
    "$defs": {"k": {"const": "x"}}}


@pytest.mark.parametrize(("text", "ok"), [
    ('{"name":"z","age":3,"score":-1.5e3,"tags":["a"],"kind":null}', True),
    ('{"name":"z","age":3,"score":2,"tags":["b","a"],"kind":"x"}', True),
    ('{"name":"z","age":3.5,"score":2,"tags":["a"],"kind":null}', False),  # integer
    ('{"name":"z","age":3,"score":2,"tags":[],"kind":null}', False),  # minItems
    ('{"name":"z","age":3,"score":2,"tags":["a","a","a"],"kind":null}', False),  # maxItems
    ('{"name":"z","age":3,"score":2,"tags":["c"],"kind":null}', False),  # enum
    ('{"age":3,"name":"z","score":2,"tags":["a"],"kind":null}', False),  # order
    ('{"name":"z","age":3,"score":2,"tags":["a"],"kind":"y"}', False),  # const via $ref
])
def test_schema_subset(text: str, ok: bool) -> None:
    assert accepts(compile_schema(SCHEMA), text.encode()) is ok


def test_unsupported_schema_is_refused() -> None:
    for bad in ({"type": "object", "patternProperties": {}}, {"type": "tuple"},
                {"$ref": "#/$defs/missing"}, {"enum": []}):
        with pytest.raises(SchemaError):
            compile_schema(bad)


def _bool_ok(obj: Any) -> bool:
    return obj in ({"ok": True}, {"ok": False})


def _optional_ok(obj: Any) -> bool:
    return (list(obj) in (["n"], ["s", "n"]) and obj["n"] is None
            and 1 <= len(obj.get("s", "x")) <= 4)


@pytest.mark.parametrize(("schema", "check"), [
    ({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}, _bool_ok),
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 4},
                                       "n": {"type": "null"}}, "required": ["n"]}, _optional_ok),
])
def test_mask_allows_exactly_the_valid_tokens(tiny_data_dir: Path, schema: dict[str, Any],
                                              check: Any) -> None:
    tok = load_tokenizer(tiny_data_dir)
    trie = TokenTrie(tok)
    root = compile_schema(schema)
    proc = JSONLogitsProcessor(root, trie, eos_ids=[0])
    V = tok.get_vocab_size()
    generated: list[int] = []
    prefix = b""
    for _ in range(30):
        out = proc(generated, torch.zeros(V))  # (V,)
        allowed = {i for i in range(V) if out[i] == 0}
        for i in range(1, V):  # brute force: token i is allowed iff prefix + bytes stays valid
            valid = bool(advance(initial_state(root), prefix + trie.token_bytes(i)))
            assert (i in allowed) == (valid and bool(trie.token_bytes(i))), (prefix, i)
        if 0 in allowed:
            assert is_complete(advance(initial_state(root), prefix))
            break
        pick = max(allowed, key=lambda i: len(trie.token_bytes(i)))  # greedy on longest token
        generated.append(pick)
        prefix += trie.token_bytes(pick)
    assert check(json.loads(prefix)), prefix


def test_sentencepiece_style_token_bytes() -> None:
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.WordLevel({"\u2581hi": 0, "<0x0A>": 1, "x": 2}, unk_token="x"))
    tok.decoder = decoders.Metaspace()
    trie = TokenTrie(tok)
    assert [trie.token_bytes(i) for i in range(3)] == [b" hi", b"\n", b"x"]
