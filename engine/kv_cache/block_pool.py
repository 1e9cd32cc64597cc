"""The pool of KV-cache blocks: reference counts, the free queue and the prefix-cache map.

Rule: every block is either referenced (`ref_cnt > 0`, held by one or more requests) or in
the free queue. A freed full block keeps its hash and stays in the hash map, so a later
request with the same prefix can take it back (`touch`); its hash is dropped only when the
block is popped from the free queue to be reused (lazy eviction, least recently freed first).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from engine.kv_cache.block import FreeBlockQueue, KVCacheBlock
from engine.kv_cache.hashing import BlockHash


class BlockPool:
    """All `num_blocks` blocks; block ids are 0..num_blocks-1 and none is reserved."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"num_blocks must be at least 1, got {num_blocks}; raise num_kv_blocks or "
                "kv_cache_memory."
            )
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        # One block per hash: a second block with the same contents is simply not registered
        # (it stays private to its request), which keeps lookup and eviction O(1).
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    def get_cached_block(self, block_hash: BlockHash) -> Optional[KVCacheBlock]:
        return self.cached_blocks.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` free blocks (evicting their cached contents), each with ref_cnt 1."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(
                f"Asked for {num_blocks} KV-cache blocks but only {self.num_free_blocks} are free."
            )
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling freed ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the back of the queue in
        the given order (so the first ones given are evicted first)."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Make a full block findable by its hash (no-op for an already cached block or hash)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is held by a request,
        since a running request would keep extending a chain the map no longer has."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        return True

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (0.0 when all are free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks
