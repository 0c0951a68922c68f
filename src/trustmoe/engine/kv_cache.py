"""Paged KV cache: fixed-size blocks, per-sequence block tables, prefix caching.

Memory is one pool per layer of `num_blocks * block_size` slots,
`k[layer]: (Hkv, num_slots, hd)`; a token at position p of a sequence lives in slot
`table[p // bs] * bs + p % bs`. A full block is keyed by (key of the block before it,
its tokens), so two prompts that share a prefix share those blocks. Blocks carry a
reference count; a cached block nobody uses sits in an LRU list and is evicted only when a
fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
from torch import Tensor

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the parent key, tokens of this block)


class NoFreeBlocksError(RuntimeError):
    pass


def block_keys(tokens: list[int], block_size: int) -> list[BlockKey]:
    """Keys of every *full* block of `tokens`, each chained to the block before it."""
    keys: list[BlockKey] = []
    parent = 0
    for i in range(len(tokens) // block_size):
        key = (parent, tuple(tokens[i * block_size:(i + 1) * block_size]))
        keys.append(key)
        parent = hash(key)
    return keys


@dataclass
class PoolStats:
    total: int
    used: int  # blocks referenced by a live sequence
    cached: int  # unreferenced blocks kept for prefix reuse
    hits: int  # prompt blocks served from the cache
    queries: int  # prompt blocks looked up


class BlockPool:
    """Allocation, reference counts and the prefix cache (no tensors here)."""

    def __init__(self, num_blocks: int, enable_prefix_cache: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_prefix_cache = enable_prefix_cache
        self.free: deque[int] = deque(range(num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced blocks
        self.ref = [0] * num_blocks
        self.key_of: list[BlockKey | None] = [None] * num_blocks
        self.block_of: dict[BlockKey, int] = {}
        self.hits = 0
        self.queries = 0

    def num_available(self) -> int:
        return len(self.free) + len(self.lru)

    def allocate(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.lru:
            b, _ = self.lru.popitem(last=False)  # evict the least recently used cached block
            key = self.key_of[b]
            if key is not None:
                del self.block_of[key]
                self.key_of[b] = None
        else:
            raise NoFreeBlocksError("KV cache is full")
        self.ref[b] = 1
        return b

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        assert self.ref[block] >= 0, f"block {block} released twice"
        if self.ref[block] == 0:
            if self.key_of[block] is not None:
                self.lru[block] = None  # most recently used at the end
            else:
                self.free.append(block)

    def match_prefix(self, keys: list[BlockKey], count: bool = True) -> list[int]:
        """Blocks for the longest cached prefix of `keys`; each returned block is referenced."""
        if not self.enable_prefix_cache:
            return []
        found: list[int] = []
        for key in keys:
            b = self.block_of.get(key)
            if b is None:
                break
            found.append(b)
        if count:
            self.queries += len(keys)
            self.hits += len(found)
        for b in found:
            if self.ref[b] == 0:
                self.lru.pop(b, None)
            self.ref[b] += 1
        return found

    def count_cached_unreferenced(self, keys: list[BlockKey]) -> tuple[int, int]:
        """(prefix blocks cached, of which unreferenced) without taking references."""
        n = unref = 0
        if not self.enable_prefix_cache:
            return 0, 0
        for key in keys:
            b = self.block_of.get(key)
            if b is None:
                break
            n += 1
            unref += self.ref[b] == 0
        return n, unref

    def register(self, block: int, key: BlockKey) -> None:
        """Mark a just-filled block as holding `key` (first writer wins)."""
        if not self.enable_prefix_cache or self.key_of[block] is not None:
            return
        if key in self.block_of:
            return
        self.key_of[block] = key
        self.block_of[key] = block

    def stats(self) -> PoolStats:
        used = self.num_blocks - len(self.free) - len(self.lru)
        return PoolStats(self.num_blocks, used, len(self.lru), self.hits, self.queries)

    def reset_prefix_cache(self) -> None:
        for b in list(self.lru):
            self.key_of[b] = None
            self.free.append(b)
        self.lru.clear()
        self.block_of = {k: b for k, b in self.block_of.items() if self.ref[b] > 0}


class PagedKVCache:
    """The K/V tensors: per layer (Hkv, num_blocks * block_size, hd)."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (n_layers, n_kv, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_layers, self.v_layers = list(self.k), list(self.v)  # per-layer views

    @staticmethod
    def bytes_per_block(n_layers: int, n_kv: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * n_kv * block_size * head_dim * elem

    def slots(self, table: list[int], start: int, end: int, device: torch.device) -> Tensor:
        """Slot ids (end - start,) of positions start..end-1 of a sequence with `table`."""
        bs = self.block_size
        pos = torch.arange(start, end, dtype=torch.long)
        blocks = torch.tensor(table, dtype=torch.long)[pos // bs]
        return (blocks * bs + pos % bs).to(device)

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        # slots: (N,); k, v: (Hkv, N, hd), rounded to the cache's dtype when it differs
        dt = self.k.dtype
        self.k_layers[layer].index_copy_(1, slots, k if k.dtype == dt else k.to(dt))
        self.v_layers[layer].index_copy_(1, slots, v if v.dtype == dt else v.to(dt))

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        # slots: (S,) -> k, v: (Hkv, S, hd)
        return self.k_layers[layer].index_select(1, slots), self.v_layers[layer].index_select(1, slots)
