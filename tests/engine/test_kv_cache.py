"""Block pool: reference counts, prefix matching by chained block keys, LRU eviction."""

from __future__ import annotations

import pytest
import torch

from trustmoe.engine.kv_cache import BlockPool, NoFreeBlocksError, PagedKVCache, block_keys


def test_block_keys_chain_on_the_whole_prefix() -> None:
    a = block_keys([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # only full blocks
    b = block_keys([9, 9, 3, 4, 5, 6], 2)
    assert a[1][1] == b[1][1] and a[1] != b[1]  # same tokens, different history -> other key


def test_allocate_release_and_exhaustion() -> None:
    pool = BlockPool(3)
    got = [pool.allocate() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and pool.num_available() == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()
    pool.release(got[1])
    assert pool.num_available() == 1 and pool.allocate() == got[1]


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    pool = BlockPool(8)
    keys = block_keys(list(range(8)), 4)
    blocks = [pool.allocate() for _ in keys]
    for b, k in zip(blocks, keys, strict=True):
        pool.register(b, k)
    hit = pool.match_prefix(keys + block_keys(list(range(12)), 4)[2:])
    assert hit == blocks
    assert pool.ref[blocks[0]] == 2
    assert pool.stats().hits == 2 and pool.stats().queries == 3
    for b in blocks:
        pool.release(b)
    assert pool.ref[blocks[0]] == 1 and pool.stats().cached == 0
    for b in hit:
        pool.release(b)
    st = pool.stats()
    assert st.used == 0 and st.cached == 2  # unreferenced but kept for reuse
    assert pool.match_prefix(keys) == blocks  # still served from the cache


def test_lru_eviction_takes_the_least_recently_released_block() -> None:
    pool = BlockPool(3)
    keys = [(0, (i,)) for i in range(3)]
    blocks = [pool.allocate() for _ in range(3)]
    for b, k in zip(blocks, keys, strict=True):
        pool.register(b, k)
    for b in (blocks[1], blocks[0], blocks[2]):  # release order: 1, 0, 2
        pool.release(b)
    assert pool.allocate() == blocks[1]  # evicted first
    assert pool.match_prefix([keys[1]]) == []  # its key is gone
    assert pool.match_prefix([keys[0]]) == [blocks[0]]  # the others survive
    assert pool.allocate() == blocks[2]


def test_disabled_prefix_cache_never_hits() -> None:
    pool = BlockPool(2, enable_prefix_cache=False)
    b = pool.allocate()
    key = (0, (1, 2))
    pool.register(b, key)
    pool.release(b)
    assert pool.match_prefix([key]) == [] and pool.stats().cached == 0


def test_paged_write_read_round_trip() -> None:
    kv = PagedKVCache(2, 2, 4, num_blocks=4, block_size=2, dtype=torch.float32,
                      device=torch.device("cpu"))
    table = [3, 0]  # positions 0,1 -> block 3; positions 2,3 -> block 0
    slots = kv.slots(table, 0, 3, torch.device("cpu"))
    assert slots.tolist() == [6, 7, 0]
    k = torch.randn(2, 3, 4)
    v = torch.randn(2, 3, 4)
    kv.write(1, slots, k, v)
    k2, v2 = kv.read(1, slots)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert kv.k[0].abs().sum() == 0  # other layer untouched
