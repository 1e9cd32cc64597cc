"""KV-cache manager: allocation, prefix hits, caching of generated blocks, freeing, stats."""

from engine.kv_cache.manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler.request import Request

BS = 4


def make_request(req_id, tokens, extra_keys=()):
    return Request(req_id, tokens, SamplingParams(), eos_token_id=None, arrival_time=0.0,
                   extra_keys=extra_keys)


def admit(manager, request):
    """What the scheduler does for a new request: hits, then the rest of the prompt."""
    hits, num_hit = manager.get_computed_blocks(request)
    blocks = manager.allocate_slots(request, request.num_tokens - num_hit, hits)
    assert blocks is not None
    request.num_computed_tokens = request.num_tokens
    return hits, num_hit


def test_allocate_and_free_counts():
    manager = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    req = make_request("a", list(range(10)))  # 3 blocks
    (new,) = manager.allocate_slots(req, 10)
    assert len(new) == 3 and manager.num_free_blocks == 7
    assert manager.get_block_ids("a")[0] == [b.block_id for b in new]
    assert abs(manager.usage - 0.3) < 1e-9
    req.num_computed_tokens = 10
    req.append_output_token(99)
    req.append_output_token(98)  # 12 tokens: still 3 blocks
    assert manager.allocate_slots(req, 2) == ([],)
    req.num_computed_tokens = 12
    req.append_output_token(97)
    assert len(manager.allocate_slots(req, 1)[0]) == 1  # token 13 needs a 4th block
    manager.free(req)
    assert manager.num_free_blocks == 10 and manager.usage == 0.0
    assert manager.get_block_ids("a")[0] == []


def test_allocation_failure_changes_nothing():
    manager = KVCacheManager(num_blocks=3, block_size=BS, enable_caching=True)
    first = make_request("a", list(range(8)))
    admit(manager, first)
    second = make_request("b", list(range(100, 112)))  # needs 3 blocks, 1 free
    assert manager.allocate_slots(second, 12) is None
    assert manager.num_free_blocks == 1
    assert manager.get_block_ids("b")[0] == []
    assert manager.take_stats() == (8, 0)  # the failed admission counts nothing


def test_prefix_hit_shares_blocks_and_counts():
    manager = KVCacheManager(num_blocks=20, block_size=BS, enable_caching=True)
    shared = list(range(12))
    a = make_request("a", shared + [50, 51])
    admit(manager, a)
    b = make_request("b", shared + [60, 61, 62])
    (hits,), num_hit = admit(manager, b)
    assert num_hit == 12 and len(hits) == 3
    assert manager.get_block_ids("b")[0][:3] == manager.get_block_ids("a")[0][:3]
    assert all(block.ref_cnt == 2 for block in hits)
    assert manager.take_stats() == (14 + 15, 12)
    assert manager.take_stats() == (0, 0)  # reset by take_stats


def test_hit_never_covers_whole_prompt():
    manager = KVCacheManager(num_blocks=20, block_size=BS, enable_caching=True)
    prompt = list(range(8))  # exactly 2 full blocks
    admit(manager, make_request("a", prompt))
    (hits,), num_hit = manager.get_computed_blocks(make_request("b", prompt))
    assert num_hit == 4 and len(hits) == 1  # last token must still be computed


def test_miss_on_different_tokens_or_extra_keys():
    manager = KVCacheManager(num_blocks=20, block_size=BS, enable_caching=True)
    admit(manager, make_request("a", list(range(9))))
    assert manager.get_computed_blocks(make_request("b", [7] + list(range(1, 9))))[1] == 0
    salted = make_request("c", list(range(9)), extra_keys=("salt",))
    assert manager.get_computed_blocks(salted)[1] == 0
    assert manager.get_computed_blocks(make_request("d", list(range(9))))[1] == 8


def test_caching_disabled_never_hits():
    manager = KVCacheManager(num_blocks=20, block_size=BS, enable_caching=False)
    admit(manager, make_request("a", list(range(9))))
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == (([],), 0)
    assert manager.take_stats() == (0, 0)


def test_freed_blocks_stay_findable_then_lru_tail_first():
    manager = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=True)
    a = make_request("a", list(range(13)))  # 3 full blocks + 1 partial = all 4 blocks
    admit(manager, a)
    a_ids = manager.get_block_ids("a")[0]
    manager.free(a)
    assert manager.num_free_blocks == 4
    # Freed in reverse: the tail block is evicted first, the prefix last.
    assert [b.block_id for b in manager.pool.free_queue] == a_ids[::-1]
    b = make_request("b", list(range(100, 105)))  # 2 blocks: evicts a's 2 tail blocks
    admit(manager, b)
    assert set(manager.get_block_ids("b")[0]) == set(a_ids[2:])
    (hits,), num_hit = manager.get_computed_blocks(make_request("c", list(range(13))))
    assert num_hit == 8  # a's first two blocks survived
    assert [blk.block_id for blk in hits] == a_ids[:2]


def test_hit_on_free_block_is_retouched_and_counts_against_free():
    manager = KVCacheManager(num_blocks=3, block_size=BS, enable_caching=True)
    a = make_request("a", list(range(9)))
    admit(manager, a)
    manager.free(a)
    b = make_request("b", list(range(8)) + [42])
    hits, num_hit = manager.get_computed_blocks(b)
    assert num_hit == 8
    assert manager.allocate_slots(b, 1, hits) is not None
    assert [blk.ref_cnt for blk in hits[0]] == [1, 1]
    assert manager.num_free_blocks == 0
    assert manager.get_block_ids("b")[0][:2] == [blk.block_id for blk in hits[0]]


def test_generated_tokens_fill_cached_blocks():
    manager = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    a = make_request("a", [1, 2, 3])
    admit(manager, a)
    for token in (4, 5, 6, 7, 8):  # decode: each sampled token is computed next step
        a.append_output_token(token)
        assert manager.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
    # Tokens 1..8 are known and computed: both blocks are cached.
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.get_computed_blocks(b)[1] == 8


def test_no_leak_after_mixed_finish_and_abort():
    manager = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    reqs = [make_request(str(i), list(range(i, i + 10))) for i in range(4)]
    for req in reqs:
        admit(manager, req)
    for req in reqs:
        manager.free(req)
    manager.free(reqs[0])  # freeing twice is harmless
    assert manager.num_free_blocks == 16 and manager.usage == 0.0
    assert all(block.ref_cnt == 0 for block in manager.pool.blocks)
    assert manager.reset_prefix_cache() is True
