"""KV-cache groups with sliding windows through the scheduler: every key a step's queries
attend is still in its group's blocks (the fake runner checks each one), the outputs equal
a run without windows, a window group holds no more blocks than its window and the step
need, so prompts that would not fit unwindowed run, and prefix hits work per group."""

from __future__ import annotations

import pytest

from engine.kv_cache.manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler.request import Request
from platforms.util import cdiv
from tests.scheduler.scheduler_fakes import (
    FakeRunner,
    make_request,
    make_scheduler,
    run_to_completion,
)

BS = 4
WINDOW = 9


def _prompts(n: int = 5, length: int = 38) -> dict[str, list[int]]:
    return {f"r{i}": [(7 * i + 3 * j) % 97 + 10 for j in range(length + 3 * i)]
            for i in range(n)}


def _run(windows, num_blocks, caching=True, budget=16, prompts=None, max_tokens=20):
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=BS, max_num_seqs=4,
                               max_num_batched_tokens=budget, enable_prefix_caching=caching,
                               kv_cache_windows=windows)
    for req_id, prompt in (prompts or _prompts()).items():
        scheduler.add_request(make_request(req_id, prompt, max_tokens=max_tokens,
                                           ignore_eos=True))
    held: list[int] = []
    runner = FakeRunner(num_blocks, BS, windows=windows)
    execute = runner.execute

    def execute_and_count(out):
        for req_id in out.num_scheduled_tokens:
            blocks = scheduler.kv_cache.req_to_blocks[req_id]
            held.extend(sum(b is not None for b in blocks[g])
                        for g, w in enumerate(windows) if w is not None)
        return execute(out)

    runner.execute = execute_and_count
    result = run_to_completion(scheduler, runner)
    assert scheduler.kv_cache.num_free_blocks == num_blocks, "blocks leaked"
    return result, held, scheduler


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("windows", [(None, WINDOW, WINDOW), (WINDOW,)])
def test_outputs_equal_a_full_attention_run_and_window_blocks_stay_bounded(windows, caching):
    reference, _, _ = _run((None,), num_blocks=400, caching=caching)
    result, held, _ = _run(windows, num_blocks=400, caching=caching)
    assert result.tokens == reference.tokens
    # A step's queries reach back W - 1 keys before its first token: with the budget's
    # 16 new tokens at most, that spans cdiv(W - 1 + 16, BS) + 1 blocks.
    assert max(held) <= cdiv(WINDOW - 1 + 16, BS) + 1


def test_window_groups_fit_where_full_attention_would_preempt():
    # Five 50-token requests of 70 tokens at the end: unwindowed, four running need
    # 4 x 18 = 72 blocks per group; with one full group and two window groups of at most
    # ~4 blocks each, 4 x (18 + 8) = 104 blocks of 110 hold them.
    windows = (None, WINDOW, WINDOW)
    prompts = _prompts(length=50)
    full, _, _ = _run((None,) * 3, num_blocks=110, prompts=prompts)
    windowed, _, _ = _run(windows, num_blocks=110, prompts=prompts)
    assert windowed.tokens == full.tokens
    assert full.num_preemptions > 0 and windowed.num_preemptions == 0


def test_prefix_hit_in_window_groups_reuses_blocks_and_keeps_outputs():
    shared = [(5 * j) % 89 + 10 for j in range(30)]
    prompts = {"a": shared + [11, 12], "b": shared + [13, 14, 15]}
    reference, _, _ = _run((None,), num_blocks=200, prompts=prompts)
    scheduler = make_scheduler(num_blocks=200, block_size=BS, max_num_seqs=4,
                               max_num_batched_tokens=64,
                               kv_cache_windows=(None, WINDOW))
    runner = FakeRunner(200, BS, windows=(None, WINDOW))
    scheduler.add_request(make_request("a", prompts["a"], max_tokens=20, ignore_eos=True))
    first = run_to_completion(scheduler, runner)
    scheduler.add_request(make_request("b", prompts["b"], max_tokens=20, ignore_eos=True))
    second = run_to_completion(scheduler, runner)
    assert second.finished["b"].num_cached_tokens == 28  # 7 full blocks of the shared 30
    assert {**first.tokens, **second.tokens} == reference.tokens


def _request(req_id, tokens):
    return Request(req_id, tokens, SamplingParams(), eos_token_id=None, arrival_time=0.0)


def test_manager_gives_back_blocks_that_left_the_window():
    manager = KVCacheManager(num_blocks=40, block_size=BS, enable_caching=True,
                             windows=(None, 8))
    req = _request("a", list(range(10)))
    assert manager.allocate_slots(req, 10) is not None
    req.num_computed_tokens = 10
    for token in range(100, 160):  # decode 60 tokens
        req.append_output_token(token)
        assert manager.allocate_slots(req, 1) is not None
        req.num_computed_tokens += 1
        full, window = manager.req_to_blocks["a"]
        assert len(full) == cdiv(req.num_computed_tokens, BS)
        kept = [b for b in window if b is not None]
        assert len(kept) <= cdiv(8, BS) + 1
        # The kept blocks are the last ones: the window's first key on.
        first = max(0, req.num_computed_tokens - 1 - 8 + 1) // BS
        assert all(b is not None for b in window[first:])
    ids_full, ids_window = manager.get_block_ids("a")
    assert ids_window[0] == 0 and len(ids_window) == len(ids_full)
    manager.free(req)
    assert manager.num_free_blocks == 40


def test_manager_window_hit_needs_only_the_window_blocks():
    manager = KVCacheManager(num_blocks=40, block_size=BS, enable_caching=True,
                             windows=(8,))
    a = _request("a", list(range(30)))
    assert manager.allocate_slots(a, 30) is not None
    a.num_computed_tokens = 30
    (a_ids,) = manager.get_block_ids("a")
    manager.free(a)
    # Evict a's first five blocks: the window from position 28 still reaches 5 and 6.
    for block_id in a_ids[:5]:
        manager.pool._evict(manager.pool.blocks[block_id])
    b = _request("b", list(range(30)) + [99])
    (hits,), num_hit = manager.get_computed_blocks(b)
    assert num_hit == 28
    first = (28 - 8 + 1) // BS
    assert all(h is None for h in hits[:first]) and all(h is not None for h in hits[first:])
