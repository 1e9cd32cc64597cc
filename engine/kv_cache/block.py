"""KV-cache blocks and the free-block queue.

Rule: a block with `ref_cnt == 0` is in the free queue and nowhere else is it "owned"; it may
still carry a `block_hash`, which keeps its contents findable by prefix caching until the block
is popped to be reused (lazy eviction).

Why a hand-made doubly linked list rather than `collections.deque` or an `OrderedDict`: a
prefix-cache hit on a freed block must take that block out of the *middle* of the queue. With
the links stored on the block itself this is O(1) with no lookup and no extra allocation,
whereas `deque.remove` is O(n) and an `OrderedDict` keyed by block id costs a hash lookup and
entry churn on every free/allocate of the hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

from engine.kv_cache.hashing import BlockHash


class KVCacheBlock:
    """One fixed-size page of KV cache, identified by `block_id` (its index on the device)."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        # Hash of the full block's tokens (chained with its prefix); None while not full or
        # not cached.
        self.block_hash: Optional[BlockHash] = None
        # Free-queue links; both None when the block is not in the queue.
        self.prev_free: Optional[KVCacheBlock] = None
        self.next_free: Optional[KVCacheBlock] = None

    def __repr__(self) -> str:
        cached = "cached" if self.block_hash is not None else "uncached"
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, {cached})"


class FreeBlockQueue:
    """LRU queue of free blocks: pop from the front (least recently freed), append at the back.

    Sentinel head/tail nodes keep every operation branch-free of empty-list special cases.
    """

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(block_id=-1)  # sentinels; never handed out
        self._tail = KVCacheBlock(block_id=-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        """The least recently freed block; raises ValueError when the queue is empty."""
        first = self._head.next_free
        if first is self._tail or first is None:
            raise ValueError("No free KV-cache block left to pop.")
        self.remove(first)
        return first

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink `block` from wherever it sits in the queue, in O(1)."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"Block {block.block_id} is not in the free queue.")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put `block` at the back: it will be evicted after every block already queued."""
        last = self._tail.prev_free
        assert last is not None  # the tail sentinel always has a predecessor
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Front (next to evict) to back."""
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free

    def __len__(self) -> int:
        return self.num_free_blocks
