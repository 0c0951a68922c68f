"""JSON schema -> the `Node` tree that `jsonmode`'s automaton walks.

The supported subset, and what each keyword guarantees about the output, is listed in
`trustmoe.serve.jsonmode`; anything outside it raises `SchemaError` (the server answers 400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class SchemaError(ValueError):
    pass


@dataclass(eq=False)
class Node:
    """One schema node. kind: any|object|array|string|number|integer|boolean|null|literal|union."""

    kind: str
    props: list[tuple[str, Node]] = field(default_factory=list)
    required: frozenset[int] = frozenset()  # indices of `props` that must appear
    free: bool = False  # object with arbitrary keys
    extra: Node | None = None  # free object: the schema of every value (None: any)
    items: Node | None = None
    min_items: int = 0
    max_items: int | None = None
    min_len: int = 0  # string length bounds, in code points
    max_len: int | None = None
    literals: tuple[bytes, ...] = ()
    options: list[Node] = field(default_factory=list)
    keys: tuple[bytes, ...] = field(init=False)  # each property's key, as JSON
    last_required: int = field(init=False)

    def __post_init__(self) -> None:
        self.keys = tuple(_dump(k) for k, _ in self.props)
        self.last_required = max(self.required, default=-1)

    def __hash__(self) -> int:
        return id(self)

    def next_keys(self, i: int) -> list[int]:
        """Properties that may come after property i (-1: none yet): in schema order, every
        optional one up to and including the first required one."""
        out = []
        for j in range(i + 1, len(self.props)):
            out.append(j)
            if j in self.required:
                break
        return out

    def can_close(self, i: int) -> bool:
        """Whether the object may end after property i (-1: none yet)."""
        return i >= self.last_required


ANY = Node("any")
FREE_OBJ = Node("object", free=True)
ANY_ARR = Node("array", items=ANY)
SUPPORTED = {"type", "properties", "required", "items", "minItems", "maxItems", "enum", "const",
             "anyOf", "oneOf", "$ref", "$defs", "definitions", "title", "description",
             "additionalProperties", "$schema", "default", "examples", "format", "strict",
             "minLength", "maxLength"}


def compile_schema(schema: dict[str, Any] | None) -> Node:
    """JSON schema -> Node (None = any JSON object, as `json_object` mode)."""
    if schema is None:
        return Node("object", free=True)
    if not isinstance(schema, dict):
        raise SchemaError("json_schema.schema must be an object")
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    return _compile(schema, defs, 0)


def _bounds(s: dict[str, Any], lo_key: str, hi_key: str) -> tuple[int, int | None]:
    lo, hi = s.get(lo_key, 0), s.get(hi_key)
    bad_hi = hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < lo)
    if not isinstance(lo, int) or isinstance(lo, bool) or lo < 0 or bad_hi:
        raise SchemaError(f"{lo_key}/{hi_key} must be integers with 0 <= {lo_key} <= {hi_key}")
    return lo, hi


def _compile(s: Any, defs: dict[str, Any], depth: int) -> Node:
    if depth > 32:
        raise SchemaError("schema nests too deeply (or $ref is recursive)")
    if s is True or s == {}:
        return ANY
    if not isinstance(s, dict):
        raise SchemaError(f"schema node must be an object, got {s!r}")
    unknown = set(s) - SUPPORTED
    if unknown:
        raise SchemaError(f"unsupported JSON schema keyword(s): {', '.join(sorted(unknown))}")
    if "$ref" in s:
        ref = s["$ref"]
        name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None
        if name not in defs:
            raise SchemaError(f"cannot resolve $ref {ref!r}")
        return _compile(defs[name], defs, depth + 1)
    if "const" in s:
        return Node("literal", literals=(_dump(s["const"]),))
    if "enum" in s:
        if not isinstance(s["enum"], list) or not s["enum"]:
            raise SchemaError("enum must be a non-empty list")
        return Node("literal", literals=tuple(_dump(v) for v in s["enum"]))
    for key in ("anyOf", "oneOf"):
        if key in s:
            if not isinstance(s[key], list) or not s[key]:
                raise SchemaError(f"{key} must be a non-empty list")
            return Node("union", options=[_compile(x, defs, depth + 1) for x in s[key]])
    t = s.get("type")
    if isinstance(t, list):
        return Node("union", options=[_compile({**s, "type": x}, defs, depth + 1) for x in t])
    if t is None:
        if "minLength" in s or "maxLength" in s:
            raise SchemaError('minLength/maxLength need "type": "string"')
        return ANY
    if t == "object":
        return _object(s, defs, depth)
    if t == "array":
        lo, hi = _bounds(s, "minItems", "maxItems")
        items = _compile(s.get("items", True), defs, depth + 1)
        return Node("array", items=items, min_items=lo, max_items=hi)
    if t == "string":
        lo, hi = _bounds(s, "minLength", "maxLength")
        return Node("string", min_len=lo, max_len=hi)
    if t in ("number", "integer", "boolean", "null"):
        if t == "boolean":
            return Node("literal", literals=(b"true", b"false"))
        if t == "null":
            return Node("literal", literals=(b"null",))
        return Node(t)
    raise SchemaError(f"unsupported type {t!r}")


def _object(s: dict[str, Any], defs: dict[str, Any], depth: int) -> Node:
    props = s.get("properties") or {}
    if not isinstance(props, dict):
        raise SchemaError("properties must be an object")
    req = s.get("required") or []
    if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
        raise SchemaError("required must be a list of property names")
    extra = s.get("additionalProperties", True)
    if not isinstance(extra, bool | dict):
        raise SchemaError("additionalProperties must be a boolean or a schema")
    extra_node = _compile(extra, defs, depth + 1) if isinstance(extra, dict) else None
    missing = [r for r in dict.fromkeys(req) if r not in props]
    if missing and extra is False:
        raise SchemaError(f"required property {missing[0]!r} is not in properties and "
                          "additionalProperties is false")
    if not props and not missing:  # no named keys: any keys, or none
        return Node("object") if extra is False else Node("object", free=True, extra=extra_node)
    named = [(k, _compile(v, defs, depth + 1)) for k, v in props.items()]
    named += [(k, extra_node or ANY) for k in missing]
    wanted = set(req)
    return Node("object", props=named,
                required=frozenset(i for i, (k, _) in enumerate(named) if k in wanted))


def _dump(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
