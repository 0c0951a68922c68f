"""`json_schema` keywords beyond shape: string minLength/maxLength and objects whose optional
properties may be left out (`required`, `additionalProperties`). The automaton is checked
byte string by byte string, then a random model generates through the real server and a
small JSON-schema validator (below; no `jsonschema` dependency) judges what came out."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmoe.serve.app import create_app
from trustmoe.serve.chat import ChatTemplate
from trustmoe.serve.jsonmode import SchemaError, advance, compile_schema, initial_state, is_complete


def validate(v: Any, s: Any, defs: dict[str, Any] | None = None, path: str = "$") -> list[str]:
    """Errors of `v` against the schema subset jsonmode supports (JSON Schema semantics)."""
    if defs is None:
        defs = {**s.get("$defs", {}), **s.get("definitions", {})} if isinstance(s, dict) else {}
    if s is True or s == {}:
        return []
    if "$ref" in s:
        return validate(v, defs[s["$ref"].rsplit("/", 1)[-1]], defs, path)
    if "const" in s:
        return [] if v == s["const"] and type(v) is type(s["const"]) else [f"{path}: != const"]
    if "enum" in s:
        return [] if any(v == e and type(v) is type(e) for e in s["enum"]) else [f"{path}: enum"]
    for key in ("anyOf", "oneOf"):
        if key in s:
            ok = [not validate(v, o, defs, path) for o in s[key]]
            return [] if (any(ok) if key == "anyOf" else sum(ok) == 1) else [f"{path}: {key}"]
    t = s.get("type")
    if isinstance(t, list):
        return [] if any(not validate(v, {**s, "type": x}, defs, path) for x in t) \
            else [f"{path}: none of {t}"]
    py = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}
    if t is not None and (not isinstance(v, py[t]) or (isinstance(v, bool) and t != "boolean")):
        return [f"{path}: not {t}"]
    errs = []
    if t == "string" and not s.get("minLength", 0) <= len(v) <= s.get("maxLength", len(v)):
        errs.append(f"{path}: length {len(v)}")
    if t == "array":
        if not s.get("minItems", 0) <= len(v) <= s.get("maxItems", len(v)):
            errs.append(f"{path}: {len(v)} items")
        for i, x in enumerate(v):
            errs += validate(x, s.get("items", True), defs, f"{path}[{i}]")
    if t == "object":
        props, extra = s.get("properties", {}), s.get("additionalProperties", True)
        errs += [f"{path}: missing {k}" for k in s.get("required", []) if k not in v]
        for k, x in v.items():
            if k in props:
                errs += validate(x, props[k], defs, f"{path}.{k}")
            elif extra is False:
                errs.append(f"{path}: extra key {k}")
            else:
                errs += validate(x, extra, defs, f"{path}.{k}")
    return errs


def accepts(schema: dict[str, Any], data: bytes) -> bool:
    s = advance(initial_state(compile_schema(schema)), data)
    return bool(s) and is_complete(s)


def _dump(v: Any, ascii_only: bool = False) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=ascii_only).encode()


# ------------------------------------------------------------------- strings

S23 = {"type": "string", "minLength": 2, "maxLength": 3}


@pytest.mark.parametrize(("data", "ok"), [
    (b'"ab"', True), (b'"abc"', True), (b'"a\\n"', True), ('"é€"'.encode(), True),
    (b'"\\u00e9x"', True), ('"😀😀"'.encode(), True), (b'"\\\\\\""', True),
    (b'""', False), (b'"a"', False), (b'"abcd"', False), (b'"a\\n\\tb"', False),
    ('"😀"'.encode(), False), ('"é€ü😀"'.encode(), False),
    (b'"\\ud83d\\ude00x"', False),  # a surrogate pair is one code point: refused, not miscounted
    (b'"\\u12"', False), (b'"a\\x"', False),
])
def test_string_length_counts_code_points(data: bytes, ok: bool) -> None:
    assert accepts(S23, data) is ok


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=7), st.integers(0, 4), st.integers(0, 4), st.booleans())
def test_string_length_matches_python_len(text: str, lo: int, extra: int, ascii_only: bool) -> None:
    schema = {"type": "string", "minLength": lo, "maxLength": lo + extra}
    want = lo <= len(text) <= lo + extra
    if ascii_only and any(ord(c) > 0xFFFF for c in text):
        want = False  # as \ud83d\ude00: surrogate escapes are refused in bounded strings
    assert accepts(schema, _dump(text, ascii_only)) is want
    assert accepts({"type": "string"}, _dump(text, ascii_only))  # unbounded: anything goes


def test_string_states_stay_finite() -> None:
    """Counting stops once no bound needs it, so masks keep hitting the cache."""
    for schema in ({"type": "string"}, {"type": "string", "minLength": 2}):
        root = compile_schema(schema)
        assert advance(initial_state(root), b'"aaa') == advance(initial_state(root), b'"a\\u1234aa')
    root = compile_schema({"type": "string", "maxLength": 5})
    assert advance(initial_state(root), b'"aaa') != advance(initial_state(root), b'"aa')


@pytest.mark.parametrize("data", [b'"\xe0\x80\x80"', b'"\xed\xa0\x80"', b'"\xc0\xaf"',
                                  b'"\xf4\x90\x80\x80"', b'"\x80"', b'"\xc3"'])
def test_strings_are_valid_utf8(data: bytes) -> None:
    assert not accepts({"type": "string"}, data)
    assert not accepts(S23, data)


def test_length_bounds_only_bind_strings() -> None:
    schema = {"type": ["string", "null", "integer"], "maxLength": 1}
    assert accepts(schema, b"null") and accepts(schema, b"12345") and accepts(schema, b'"x"')
    assert not accepts(schema, b'"xy"')


@pytest.mark.parametrize("bad", [
    {"type": "string", "minLength": -1}, {"type": "string", "minLength": 3, "maxLength": 2},
    {"type": "string", "maxLength": "3"}, {"type": "string", "minLength": True},
    {"maxLength": 3}, {"type": "string", "pattern": "^a"}, {"type": "integer", "minimum": 0},
])
def test_bad_or_unsupported_string_schemas_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        compile_schema(bad)


# ------------------------------------------------------------------- objects

OBJ = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                        "c": {"type": "boolean"}}, "required": ["b"]}
VALS = {"a": 1, "b": "x", "c": True}


@pytest.mark.parametrize("required", [[], ["b"], ["a", "c"], ["a", "b", "c"]])
def test_every_ordered_subset_with_the_required_keys(required: list[str]) -> None:
    schema = {**OBJ, "required": required}
    for n in range(4):
        for keys in itertools.combinations("abc", n):
            obj = {k: VALS[k] for k in keys}
            assert accepts(schema, _dump(obj)) is (set(required) <= set(keys)), obj


@pytest.mark.parametrize("text", [
    '{"c":true,"b":"x"}',  # out of schema order
    '{"b":"x","b":"y"}', '{"b":"x","d":1}', '{"a":1,}', '{,"b":"x"}', '{"b":"x",}',
    '{"a":"1","b":"x"}', "{}",
])
def test_objects_refuse(text: str) -> None:
    assert not accepts(OBJ, text.encode())


def test_additional_properties() -> None:
    closed = {"type": "object", "additionalProperties": False}
    assert accepts(closed, b"{}") and not accepts(closed, b'{"x":1}')
    ints = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert accepts(ints, b'{"x":1,"y":-2}') and not accepts(ints, b'{"x":"s"}')
    # a required key without a property schema takes the additionalProperties schema
    req = {"type": "object", "properties": {"a": {"type": "null"}}, "required": ["z"],
           "additionalProperties": {"type": "integer"}}
    assert accepts(req, b'{"z":3}') and accepts(req, b'{"a":null,"z":3}')
    assert not accepts(req, b'{"a":null}') and not accepts(req, b'{"z":"s"}')
    with pytest.raises(SchemaError, match="additionalProperties"):
        compile_schema({**req, "additionalProperties": False})
    for bad in ({"type": "object", "required": "a"}, {"type": "object", "required": [1]},
                {"type": "object", "additionalProperties": 3}):
        with pytest.raises(SchemaError):
            compile_schema(bad)


def test_keys_sharing_a_prefix() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "null"}, "ab": {"type": "null"}}}
    for text in ('{"a":null}', '{"ab":null}', '{"a":null,"ab":null}', "{}"):
        assert accepts(schema, text.encode()), text
    assert not accepts(schema, b'{"ab":null,"a":null}')


def test_validator_agrees_with_the_automaton_on_samples() -> None:
    """The test's own validator is the judge below: check it against the automaton first."""
    for schema in (OBJ, S23, SCHEMA):
        for text in ('{"b":"x"}', '{"a":1}', '"ab"', '"a"', '{"id":"ab","kind":"cat"}',
                     '{"id":"abcdefghijk","kind":"cat"}', '{"kind":"cat","id":"ab"}'):
            if accepts(schema, text.encode()):
                assert validate(json.loads(text), schema) == [], (schema, text)


# ------------------------------------------------------------------- generation

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "minLength": 2, "maxLength": 6},
        "nick": {"type": "string", "maxLength": 3},
        "kind": {"enum": ["cat", "dog"]},
        "size": {"type": "integer"},
        "meta": {"$ref": "#/$defs/meta"},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 2},
                 "maxItems": 2},
    },
    "required": ["id", "kind"],
    "additionalProperties": False,
    "$defs": {"meta": {"type": "object", "additionalProperties": False,
                       "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string",
                                                                              "null"],
                                                                     "minLength": 1,
                                                                     "maxLength": 4}},
                       "required": ["ok"]}},
}


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, live_server: Any, shared_engine: Any) -> Iterator[openai.OpenAI]:
    app = create_app(shared_engine, chat_template=ChatTemplate.from_model_dir(tiny_model_dir))
    with live_server(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                            timeout=60)


def test_generated_json_validates(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    """A random model, sampled hot, through the server: every answer validates, and across
    the seeds optional properties are both emitted and skipped."""
    seen: list[set[str]] = []
    for seed in range(8):
        r = client.chat.completions.create(
            model=tiny_model_dir.name, messages=[{"role": "user", "content": "json please"}],
            max_tokens=200, temperature=0.0 if seed == 0 else 1.5, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "t",
                                                                     "schema": SCHEMA}})
        text = r.choices[0].message.content or ""
        assert r.choices[0].finish_reason == "stop", text
        obj = json.loads(text)
        assert validate(obj, SCHEMA) == [], text
        seen.append(set(obj))
    optional = {"nick", "size", "meta", "tags"}
    assert any(keys & optional for keys in seen), seen
    assert any(optional - keys for keys in seen), seen
