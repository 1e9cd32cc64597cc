"""Paged KV-cache bookkeeping (torch-free): blocks, chained block hashes, the manager."""

from engine.kv_cache.block import FreeBlockQueue, KVCacheBlock
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.hashing import BlockHash, extend_block_hashes, hash_block_tokens
from engine.kv_cache.manager import KVCacheManager

__all__ = [
    "BlockHash",
    "BlockPool",
    "FreeBlockQueue",
    "KVCacheBlock",
    "KVCacheManager",
    "extend_block_hashes",
    "hash_block_tokens",
]
