"""Block pool and free queue: ref counts, LRU order, O(1) middle removal, lazy eviction."""

import pytest

from engine.kv_cache.block import FreeBlockQueue, KVCacheBlock
from engine.kv_cache.block_pool import BlockPool


def ids(blocks):
    return [b.block_id for b in blocks]


def test_free_queue_order_and_middle_remove():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert ids(queue) == [0, 1, 2, 3, 4]
    queue.remove(blocks[2])
    assert ids(queue) == [0, 1, 3, 4] and len(queue) == 4
    assert queue.popleft() is blocks[0]
    queue.append(blocks[2])
    assert ids(queue) == [1, 3, 4, 2]
    with pytest.raises(ValueError):
        queue.remove(blocks[0])  # not in the queue


def test_pop_empty_queue_raises():
    queue = FreeBlockQueue([KVCacheBlock(0)])
    queue.popleft()
    with pytest.raises(ValueError):
        queue.popleft()


def test_ref_counts_and_touch():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    assert (a.ref_cnt, b.ref_cnt, pool.num_free_blocks) == (1, 1, 2)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a, b])
    assert (a.ref_cnt, b.ref_cnt, pool.num_free_blocks) == (1, 0, 3)
    pool.free_blocks([a])
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(5)


def test_lazy_eviction_keeps_hash_until_reuse():
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_block(a, b"h" * 32)
    pool.free_blocks([a, b])  # a is evicted first
    assert pool.get_cached_block(b"h" * 32) is a  # still findable after free
    pool.touch([a])  # re-touched out of the middle/front of the free queue
    assert a.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free_blocks([a])
    (first,) = pool.get_new_blocks(1)
    assert first is b  # b was freed earlier than a's second free
    (second,) = pool.get_new_blocks(1)
    assert second is a and a.block_hash is None
    assert pool.get_cached_block(b"h" * 32) is None


def test_reset_prefix_cache_only_when_all_free():
    pool = BlockPool(2, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_block(a, b"k" * 32)
    assert pool.reset_prefix_cache() is False
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(b"k" * 32) is None and a.block_hash is None


def test_no_caching_means_no_hash():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_block(a, b"k" * 32)
    assert pool.get_cached_block(b"k" * 32) is None


def test_bad_num_blocks():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, enable_caching=True)
