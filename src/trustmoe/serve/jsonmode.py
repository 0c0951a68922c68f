"""JSON-constrained decoding: a byte-level JSON(-schema) automaton that masks the vocabulary.

No grammar library on PyPI fitted (they pull a CUDA torch or need transformers at run time),
so this is a small pushdown automaton over bytes. The state is a frozenset of stacks (so
`anyOf`, type lists and optional properties are plain nondeterminism); a frame is a small
tuple. Each step the allowed tokens are found by walking a trie of the tokens' bytes from the
current state, pruning at the first byte the automaton rejects; masks are cached by state.

Output is compact JSON (no whitespace outside strings): a random or weak model cannot stall
in whitespace. Strings are valid UTF-8. Schema subset:

- type (incl. lists), enum, const, anyOf/oneOf, $ref to #/$defs or #/definitions;
- objects: properties are emitted in schema order; those in `required` always, the others
  may be skipped (no `required`: all optional). Required names missing from `properties`
  take the `additionalProperties` schema. Extra keys are never emitted next to `properties`;
  an object without properties takes any keys, with values of the `additionalProperties`
  schema, or none at all when it is false;
- arrays: items, minItems/maxItems;
- strings: minLength/maxLength, counted in code points of the decoded value (an escape is
  one character; \\u escapes of surrogates are refused in such strings so that holds).

Annotations (title, description, default, examples, format, $schema, strict) are ignored.
Anything else (pattern, minimum, ...) raises `SchemaError` (the server answers 400).

Tool calls (`tool_calls_state`) wrap the same automaton: each call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` under the schema of a call to an
enabled tool, calls may follow each other (optionally one newline apart) up to `max_calls`,
and nothing but the end of the turn may follow the last. With `tool_choice` "auto" free text
comes first (`text` frame: any bytes, watching for `<tool_call>`); once the text spells that
marker the output is committed to a call and only a valid one can be decoded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from trustmoe.serve.schema import ANY, ANY_ARR, FREE_OBJ, Node, SchemaError, compile_schema
from trustmoe.serve.vocab import TokenTrie

__all__ = ["CALL_CLOSE", "CALL_OPEN", "JSONLogitsProcessor", "Node", "SchemaError", "advance",
           "compile_schema", "initial_state", "is_complete", "step", "tool_calls_state"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_OPEN, _CLOSE = CALL_OPEN.encode(), CALL_CLOSE.encode()
assert _OPEN[0] not in _OPEN[1:]  # so a failed partial match restarts at "<" or at nothing


# ---------------------------------------------------------------- the automaton
# frames: ("val", node) | ("str", mode, count, min_len, max_len) | ("num", phase, integer_only,
#         digits) | ("lit", options, pos) | ("obj", node, phase, i) | ("arr", node, phase, count)
#         | ("text", matched, call, max_calls): free text, `matched` bytes of <tool_call> seen
#         | ("calls", call, done, max_calls, newline): `done` calls decoded; another, or the end
# A string's mode: 0 plain, 1 after a backslash, 2..5 the 1st..4th hex digit of \u, 6 the 2nd
# hex digit after \uD (no surrogates), or (low, high, left): inside a UTF-8 character, the next
# byte in [low, high], `left` bytes to go. Its count runs only while a bound needs it.
Stack = tuple[tuple[Any, ...], ...]
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
NUM_END = {"int0", "int", "frac", "exp"}  # phases after which a number may end
MAX_DIGITS = {"sign": 0, "int0": 1, "int": 15, "dot": 0, "frac": 15, "e": 0, "esign": 0, "exp": 3}
SAME_RUN = {("dot", "frac"), ("esign", "exp"), ("e", "exp")}  # digit runs that continue
CONT = (0x80, 0xBF)
UTF8_LEAD: dict[int, tuple[int, int, int]] = {  # lead byte -> its first continuation (RFC 3629)
    **{b: (*CONT, 1) for b in range(0xC2, 0xE0)}, **{b: (*CONT, 2) for b in range(0xE1, 0xF0)},
    0xE0: (0xA0, 0xBF, 2), 0xED: (0x80, 0x9F, 2),  # no overlongs, no UTF-16 surrogates
    **{b: (*CONT, 3) for b in range(0xF1, 0xF4)}, 0xF0: (0x90, 0xBF, 3), 0xF4: (0x80, 0x8F, 3)}


def _start(node: Node, b: int, rest: Stack) -> list[Stack]:
    """Start a value of `node` with byte b on top of `rest`."""
    k = node.kind
    if k == "union":
        return [s for o in node.options for s in _start(o, b, rest)]
    out: list[Stack] = []
    if k in ("any", "object") and b == ord("{"):
        if k == "object" and not node.free:  # named properties: a key (or an empty object)
            out += _keys(node, -1, rest)
            if node.can_close(-1):
                out.append((*rest, ("obj", node, "open", -1)))
        else:
            out.append((*rest, ("obj", node if k == "object" else FREE_OBJ, "open", 0)))
    if k in ("any", "array") and b == ord("["):
        out.append((*rest, ("arr", node if k == "array" else ANY_ARR, "open", 0)))
    if k in ("any", "string") and b == ord('"'):
        out.append((*rest, ("str", 0, 0, node.min_len, node.max_len)))
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


def _keys(node: Node, i: int, rest: Stack) -> list[Stack]:
    """One stack per property that may follow property i, expecting its key."""
    return [(*rest, ("obj", node, "colon", j), ("lit", (node.keys[j],), 0))
            for j in node.next_keys(i)]


def _can_close(frame: tuple[Any, ...]) -> bool:
    """A number or literal that may end here (it ends when a byte does not continue it), free
    text, or a run of tool calls with at least one call in it."""
    if frame[0] == "num":
        return frame[1] in NUM_END
    if frame[0] == "lit":
        return any(len(o) == frame[2] for o in frame[1])
    if frame[0] == "text":
        return True
    if frame[0] == "calls":
        return bool(frame[2])
    return False


def _call(rest: Stack, call: Node, done: int, most: int) -> Stack:
    """Just after `<tool_call>`: the call's JSON, then `</tool_call>`, then what may follow."""
    return (*rest, ("calls", call, done + 1, most, False), ("lit", (_CLOSE,), 0), ("val", call))


def _text(top: tuple[Any, ...], rest: Stack, b: int) -> list[Stack]:
    _, k, call, most = top
    k = k + 1 if _OPEN[k] == b else int(b == _OPEN[0])
    if k == len(_OPEN):  # committed: from here on only a valid call
        return [_call(rest, call, 0, most)]
    return [(*rest, ("text", k, call, most))]


def _calls(top: tuple[Any, ...], rest: Stack, b: int) -> list[Stack]:
    _, call, done, most, newline = top
    out: list[Stack] = []
    if b == ord("\n") and done and not newline:
        out.append((*rest, ("calls", call, done, most, True)))
    if done < most and b == _OPEN[0]:
        out.append((*_call(rest, call, done, most), ("lit", (_OPEN,), 1)))
    return out


def tool_calls_state(call: Node, max_calls: int, allow_text: bool) -> State:
    """Start state of a turn that answers with tool calls (`allow_text`: text first, or calls)."""
    if allow_text:
        return frozenset({(("text", 0, call, max_calls),)})
    return frozenset({(("calls", call, 0, max_calls, False),)})


def step(stack: Stack, b: int) -> list[Stack]:
    if not stack:
        return []
    top, rest = stack[-1], stack[:-1]
    kind = top[0]
    if kind == "str":
        return _str(top, rest, b)
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
    if kind == "text":
        return _text(top, rest, b)
    if kind == "calls":
        return _calls(top, rest, b)
    return []


def _str(top: tuple[Any, ...], rest: Stack, b: int) -> list[Stack]:
    _, mode, n, lo, hi = top
    if isinstance(mode, tuple):  # inside a UTF-8 character
        low, high, left = mode
        if not low <= b <= high:
            return []
        return [(*rest, ("str", (*CONT, left - 1) if left > 1 else 0, n, lo, hi))]
    if mode == 1:
        if b in b'"\\/bfnrt':
            return [(*rest, ("str", 0, n, lo, hi))]
        return [(*rest, ("str", 2, n, lo, hi))] if b == ord("u") else []
    if mode >= 2:
        if b not in HEX or (mode == 6 and b not in b"01234567"):
            return []
        if mode == 2 and b in b"dD" and (lo or hi is not None):  # one \u, one code point
            return [(*rest, ("str", 6, n, lo, hi))]
        nxt = 4 if mode == 6 else mode + 1 if mode < 5 else 0
        return [(*rest, ("str", nxt, n, lo, hi))]
    if b == ord('"'):
        return [rest] if n >= lo else []
    if b < 0x20 or (hi is not None and n >= hi):
        return []
    if hi is not None or n < lo:  # a character starts here: count it while it matters
        n += 1
    if b == ord("\\"):
        return [(*rest, ("str", 1, n, lo, hi))]
    if b < 0x80:
        return [(*rest, ("str", 0, n, lo, hi))]
    lead = UTF8_LEAD.get(b)
    return [(*rest, ("str", lead, n, lo, hi))] if lead else []


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
            return [(*rest, ("obj", node, "colon", i), ("str", 0, 0, 0, None))]
        if phase == "open" and c == "}":
            return [rest]
        if phase == "colon" and c == ":":
            return [(*rest, ("obj", node, "value", i))]
        if phase == "value":
            return _start(node.extra or ANY, b, (*rest, ("obj", node, "after", i + 1)))
        if phase == "after":
            if c == ",":
                return [(*rest, ("obj", node, "key", i))]
            if c == "}":
                return [rest]
        return []
    if phase == "open":  # "{" of an object that may stay empty
        return [rest] if c == "}" else []
    if phase == "colon" and c == ":":
        return [(*rest, ("obj", node, "value", i))]
    if phase == "value":
        return _start(node.props[i][1], b, (*rest, ("obj", node, "after", i)))
    if phase == "after":
        if c == ",":
            return _keys(node, i, rest)
        if c == "}" and node.can_close(i):
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
    return any(_done(st) for st in state)


def _done(st: Stack) -> bool:
    if len(st) == 2 and st[0][0] == "calls" and _can_close(st[1]):  # after "</tool_call>"
        st = st[:1]
    return not st or (len(st) == 1 and _can_close(st[0]))


class JSONLogitsProcessor:
    """`f(generated_ids, logits (V,)) -> logits (V,)` that keeps the output valid JSON."""

    def __init__(self, root: Node, trie: TokenTrie, eos_ids: list[int],
                 cache: OrderedDict[Any, torch.Tensor] | None = None, start: State | None = None
                 ) -> None:
        self.root, self.trie, self.eos_ids = root, trie, eos_ids
        self.start = start if start is not None else initial_state(root)
        self.state = self.start
        self.consumed = 0
        self.cache: OrderedDict[Any, torch.Tensor] = cache if cache is not None else OrderedDict()

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(generated) < self.consumed:  # restarted: replay from the beginning
            self.state, self.consumed = self.start, 0
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
        if state and all(len(st) == 1 and st[0][0] == "text" for st in state):
            # free text: every token, except those that complete "<tool_call>" (they hold its
            # final ">") and then go on with bytes no valid call starts with
            mask[self.trie.all_ids()] = True
            bad = [i for i in self.trie.ids_with(_OPEN[-1]) if not advance(state, self.trie.token_bytes(i))]
            if bad:
                mask[bad] = False
        elif state:
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
