"""JSON-constrained decoding: a byte-level JSON(-schema) automaton that masks the vocabulary.

No grammar library on PyPI fitted (they pull a CUDA torch or need transformers at run time),
so this is a small pushdown automaton over bytes. The state is a frozenset of stacks (so
`anyOf` and type lists are plain nondeterminism); a frame is a small tuple. Each step the
allowed tokens are found by walking a trie of the tokens' bytes from the current state,
pruning at the first byte the automaton rejects; masks are cached by state.

Output is compact JSON (no whitespace outside strings): a random or weak model cannot stall
in whitespace. Schema subset: type (incl. lists), properties (emitted in order, all of them),
items, minItems/maxItems, enum, const, anyOf/oneOf, $ref to #/$defs or #/definitions.
Anything else raises `SchemaError` (the server answers 400).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from trustmoe.serve.vocab import TokenTrie


class SchemaError(ValueError):
    pass


@dataclass(eq=False)
class Node:
    """One schema node. kind: any|object|array|string|number|integer|boolean|null|literal|union."""

    kind: str
    props: list[tuple[str, Node]] = field(default_factory=list)
    free: bool = False  # object with arbitrary keys
    items: Node | None = None
    min_items: int = 0
    max_items: int | None = None
    literals: tuple[bytes, ...] = ()
    options: list[Node] = field(default_factory=list)

    def __hash__(self) -> int:
        return id(self)


ANY = Node("any")
FREE_OBJ = Node("object", free=True)
ANY_ARR = Node("array", items=ANY)
SUPPORTED = {"type", "properties", "required", "items", "minItems", "maxItems", "enum", "const",
             "anyOf", "oneOf", "$ref", "$defs", "definitions", "title", "description",
             "additionalProperties", "$schema", "default", "examples", "format", "strict"}


def compile_schema(schema: dict[str, Any] | None) -> Node:
    """JSON schema -> Node (None = any JSON object, as `json_object` mode)."""
    if schema is None:
        return Node("object", free=True)
    if not isinstance(schema, dict):
        raise SchemaError("json_schema.schema must be an object")
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    return _compile(schema, defs, 0)


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
        return ANY
    if t == "object":
        props = s.get("properties") or {}
        if not isinstance(props, dict):
            raise SchemaError("properties must be an object")
        if not props:
            return Node("object", free=True)
        return Node("object", props=[(k, _compile(v, defs, depth + 1)) for k, v in props.items()])
    if t == "array":
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        bad_hi = hi is not None and (not isinstance(hi, int) or hi < lo)
        if not isinstance(lo, int) or lo < 0 or bad_hi:
            raise SchemaError("minItems/maxItems must be integers with 0 <= minItems <= maxItems")
        items = _compile(s.get("items", True), defs, depth + 1)
        return Node("array", items=items, min_items=lo, max_items=hi)
    if t in ("string", "number", "integer", "boolean", "null"):
        if t == "boolean":
            return Node("literal", literals=(b"true", b"false"))
        if t == "null":
            return Node("literal", literals=(b"null",))
        return Node(t)
    raise SchemaError(f"unsupported type {t!r}")


def _dump(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- the automaton
# frames: ("val", node) | ("str", esc, utf8_left) | ("num", phase, integer_only, digits)
#         ("lit", options, pos) | ("obj", node, phase, i) | ("arr", node, phase, count)
Stack = tuple[tuple[Any, ...], ...]
DIGITS = frozenset(b"0123456789")
NUM_END = {"int0", "int", "frac", "exp"}  # phases after which a number may end
MAX_DIGITS = {"sign": 0, "int0": 1, "int": 15, "dot": 0, "frac": 15, "e": 0, "esign": 0, "exp": 3}
SAME_RUN = {("dot", "frac"), ("esign", "exp"), ("e", "exp")}  # digit runs that continue


def _start(node: Node, b: int, rest: Stack) -> list[Stack]:
    """Start a value of `node` with byte b on top of `rest`."""
    k = node.kind
    if k == "union":
        return [s for o in node.options for s in _start(o, b, rest)]
    out: list[Stack] = []
    if k in ("any", "object") and b == ord("{"):
        if k == "object" and not node.free:  # fixed properties: the first key comes next
            key = ("lit", (_dump(node.props[0][0]),), 0)
            out.append((*rest, ("obj", node, "colon", 0), key))
        else:
            out.append((*rest, ("obj", FREE_OBJ, "open", 0)))
    if k in ("any", "array") and b == ord("["):
        out.append((*rest, ("arr", node if k == "array" else ANY_ARR, "open", 0)))
    if k in ("any", "string") and b == ord('"'):
        out.append((*rest, ("str", 0, 0)))
    if k in ("any", "number", "integer"):
        phase = _num_next("sign", b, False) if b != ord("-") else "sign"
        if phase:
            out.append((*rest, ("num", phase, k == "integer", int(phase != "sign"))))
    if k == "any":
        for lit in (b"true", b"false", b"null"):
            if lit[0] == b:
                out.append((*rest, ("lit", (lit,), 1)))
    if k == "literal":
        opts = tuple(x for x in node.literals if x and x[0] == b)
        if opts:
            out.append((*rest, ("lit", opts, 1)))
    return out


def _can_close(frame: tuple[Any, ...]) -> bool:
    """A number or literal that may end here (it ends when a byte does not continue it)."""
    if frame[0] == "num":
        return frame[1] in NUM_END
    if frame[0] == "lit":
        return any(len(o) == frame[2] for o in frame[1])
    return False


def step(stack: Stack, b: int) -> list[Stack]:
    if not stack:
        return []
    top, rest = stack[-1], stack[:-1]
    kind = top[0]
    if kind == "str":
        _, esc, left = top
        if left:
            return [(*rest, ("str", 0, left - 1))] if 0x80 <= b <= 0xBF else []
        if esc == 1:
            if b in b'"\\/bfnrt':
                return [(*rest, ("str", 0, 0))]
            return [(*rest, ("str", 2, 0))] if b == ord("u") else []
        if esc >= 2:
            if b in b"0123456789abcdefABCDEF":
                return [(*rest, ("str", esc + 1 if esc < 5 else 0, 0))]
            return []
        if b == ord('"'):
            return [rest]
        if b == ord("\\"):
            return [(*rest, ("str", 1, 0))]
        if b < 0x20:
            return []
        if b < 0x80:
            return [stack]
        n = 1 if 0xC2 <= b <= 0xDF else 2 if 0xE0 <= b <= 0xEF else 3 if 0xF0 <= b <= 0xF4 else 0
        return [(*rest, ("str", 0, n))] if n else []
    if kind == "num":
        _, phase, integer, digits = top
        nxt = _num_next(phase, b, integer)
        if nxt:
            n = digits + 1 if nxt == phase or (phase, nxt) in SAME_RUN else int(b in DIGITS)
            if n > MAX_DIGITS[nxt]:  # keep numbers finite: a weak model loves digits
                return step(rest, b) if phase in NUM_END else []
            return [(*rest, ("num", nxt, integer, n))]
        return step(rest, b) if phase in NUM_END else []
    if kind == "lit":
        _, opts, pos = top
        cont = tuple(o for o in opts if len(o) > pos and o[pos] == b)
        out: list[Stack] = [(*rest, ("lit", cont, pos + 1))] if cont else []
        if any(len(o) == pos for o in opts):  # complete: the byte belongs to the parent
            out += step(rest, b)
        return out
    if kind == "val":
        return _start(top[1], b, rest)
    if kind == "obj":
        return _obj(top, rest, b)
    if kind == "arr":
        return _arr(top, rest, b)
    return []


def _num_next(phase: str, b: int, integer: bool) -> str | None:
    d = b in DIGITS
    if phase == "sign":
        return "int0" if b == ord("0") else "int" if d else None
    if phase in ("int0", "int"):
        if d and phase == "int":
            return "int"
        if not integer and b == ord("."):
            return "dot"
        if not integer and b in b"eE":
            return "e"
        return None
    if phase in ("dot", "frac"):
        if d:
            return "frac"
        return "e" if phase == "frac" and b in b"eE" else None
    if phase == "e":
        return "esign" if b in b"+-" else "exp" if d else None
    if phase in ("esign", "exp"):
        return "exp" if d else None
    return None


def _obj(top: tuple[Any, ...], rest: Stack, b: int) -> list[Stack]:
    _, node, phase, i = top
    c = chr(b)
    if node.free:
        if phase in ("open", "key") and c == '"':
            return [(*rest, ("obj", node, "colon", i), ("str", 0, 0))]
        if phase == "open" and c == "}":
            return [rest]
        if phase == "colon" and c == ":":
            return [(*rest, ("obj", node, "value", i))]
        if phase == "value":
            return _start(ANY, b, (*rest, ("obj", node, "after", i + 1)))
        if phase == "after":
            if c == ",":
                return [(*rest, ("obj", node, "key", i))]
            if c == "}":
                return [rest]
        return []
    if phase == "colon" and c == ":":
        return [(*rest, ("obj", node, "value", i))]
    if phase == "value":
        return _start(node.props[i][1], b, (*rest, ("obj", node, "after", i)))
    if phase == "after":
        if i + 1 < len(node.props) and c == ",":
            key = ("lit", (_dump(node.props[i + 1][0]),), 0)
            return [(*rest, ("obj", node, "colon", i + 1), key)]
        if i + 1 == len(node.props) and c == "}":
            return [rest]
    return []


def _arr(top: tuple[Any, ...], rest: Stack, b: int) -> list[Stack]:
    _, node, phase, n = top
    c = chr(b)
    close_ok = n >= node.min_items
    more_ok = node.max_items is None or n < node.max_items
    if c == "]" and phase in ("open", "after") and close_ok:
        return [rest]
    if phase == "after" and c == "," and more_ok:
        return [(*rest, ("arr", node, "item", n))]
    if phase in ("open", "item") and more_ok:
        return _start(node.items or ANY, b, (*rest, ("arr", node, "after", n + 1)))
    return []


State = frozenset[Stack]


def initial_state(root: Node) -> State:
    return frozenset({(("val", root),)})


def advance(state: State, data: bytes) -> State:
    for b in data:
        state = frozenset(s for st in state for s in step(st, b))
        if not state:
            break
    return state


def is_complete(state: State) -> bool:
    return any(not st or (len(st) == 1 and _can_close(st[0])) for st in state)


class JSONLogitsProcessor:
    """`f(generated_ids, logits (V,)) -> logits (V,)` that keeps the output valid JSON."""

    def __init__(self, root: Node, trie: TokenTrie, eos_ids: list[int],
                 cache: OrderedDict[Any, torch.Tensor] | None = None) -> None:
        self.root, self.trie, self.eos_ids = root, trie, eos_ids
        self.state = initial_state(root)
        self.consumed = 0
        self.cache: OrderedDict[Any, torch.Tensor] = cache if cache is not None else OrderedDict()

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(generated) < self.consumed:  # restarted: replay from the beginning
            self.state, self.consumed = initial_state(self.root), 0
        for tid in generated[self.consumed:]:
            self.state = advance(self.state, self.trie.token_bytes(tid))
        self.consumed = len(generated)
        mask = self.allowed(self.state)  # (V,) bool
        n = logits.shape[-1]
        if mask.shape[0] < n:
            mask = torch.cat([mask, mask.new_zeros(n - mask.shape[0])])
        mask = mask[:n].to(logits.device)
        if not bool(mask.any()):  # dead end (cannot happen for a valid state): let EOS end it
            mask = torch.zeros(n, dtype=torch.bool, device=logits.device)
            mask[[i for i in self.eos_ids if i < n]] = True
        return logits.masked_fill(~mask, float("-inf"))

    def allowed(self, state: State) -> torch.Tensor:
        key = state  # states hold their schema nodes, so the key stays unique while cached
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        mask = torch.zeros(self.trie.vocab_size, dtype=torch.bool)
        if state:
            ids = self.trie.walk(state, lambda s, b: frozenset(x for st in s for x in step(st, b)))
            if ids:
                mask[ids] = True
        if is_complete(state):
            for i in self.eos_ids:
                if i < self.trie.vocab_size:
                    mask[i] = True
        self.cache[key] = mask
        if len(self.cache) > 4096:
            self.cache.popitem(last=False)
        return mask
