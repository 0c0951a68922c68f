"""The vocabulary as bytes: each token's exact byte string and a byte trie over all tokens.

Byte-level BPE tokens are stored as printable stand-ins for bytes (GPT-2's `bytes_to_unicode`);
this inverts that map so a token's bytes are exact even when it holds half a UTF-8 character.
Special tokens are left out of the trie (they never appear inside constrained output).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


class _Node:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.ids: list[int] = []


class TokenTrie:
    def __init__(self, tok: Tokenizer) -> None:
        spec: dict[str, Any] = json.loads(tok.to_str())
        byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        inv = {c: b for b, c in bytes_to_unicode().items()}
        special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._bytes: list[bytes] = []
        self._all: list[int] | None = None
        self._with: dict[int, list[int]] = {}
        self.root = _Node()
        for i in range(self.vocab_size):
            s = tok.id_to_token(i)
            if s is None or i in special:
                data = b""
            elif byte_level and all(c in inv for c in s):
                data = bytes(inv[c] for c in s)
            elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):  # SentencePiece byte
                data = bytes([int(s[3:5], 16)])
            elif "\u2581" in s:  # SentencePiece marks a leading space with U+2581
                data = s.replace("\u2581", " ").encode("utf-8")
            else:
                data = tok.decode([i], skip_special_tokens=False).encode("utf-8")
            self._bytes.append(data)
            if data and i not in special:
                node = self.root
                for b in data:
                    node = node.children.setdefault(b, _Node())
                node.ids.append(i)

    def all_ids(self) -> list[int]:
        """Ids of every token in the trie (every token with bytes, specials left out)."""
        if self._all is None:
            self._all = [i for i, b in enumerate(self._bytes) if b]
        return self._all

    def ids_with(self, byte: int) -> list[int]:
        """Ids of the trie's tokens whose bytes contain `byte`."""
        if byte not in self._with:
            self._with[byte] = [i for i, b in enumerate(self._bytes) if byte in b]
        return self._with[byte]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def walk(self, state: Any, step: Callable[[Any, int], Any]) -> list[int]:
        """Ids of every token whose bytes `step` accepts one by one from `state`."""
        out: list[int] = []
        todo: list[tuple[_Node, Any]] = [(self.root, state)]
        while todo:
            node, st = todo.pop()
            for b, child in node.children.items():
                nxt = step(st, b)
                if nxt:
                    out.extend(child.ids)
                    if child.children:
                        todo.append((child, nxt))
        return out
