"""Test doubles for driving the scheduler: a fake model runner and a step loop.

The fake runner is stateful like the real worker (full data once, deltas after) and keeps a
fake paged KV cache: each computed position writes its token id into the slot its block
table names, and the next token is a function of what it reads back through the block table.
So a wrong block table, a bad prefix hit or a lost block changes the outputs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from engine.config import CacheConfig, SchedulerConfig
from engine.messages.core import EngineCoreOutput
from engine.messages.step import ModelRunnerOutput, SchedulerOutput
from engine.sampling_params import SamplingParams
from engine.scheduler.request import Request
from engine.scheduler.scheduler import Scheduler


def mixing_next_token(seen: list[int]) -> int:
    """A deterministic 'model': depends on every token of the context and its order."""
    acc = len(seen)
    for token in seen:
        acc = (acc * 31 + token) % 1_000_003
    return 10 + acc % 500  # >= 10 keeps small ids free for EOS / stop tokens in tests


def counting_next_token(seen: list[int]) -> int:
    return seen[-1] + 1


@dataclass
class _ReqState:
    tokens: list[int]  # prompt + every token sampled (the fake's "device" holds them all)
    block_ids: tuple[list[int], ...]  # per KV-cache group
    num_computed: int
    sent: list[int]  # prompt + the outputs the scheduler has sent so far


@dataclass
class FakeRunner:
    num_blocks: int
    block_size: int
    next_token: Callable[[list[int]], int] = mixing_next_token
    # Per KV-cache group its sliding window (None: full): a group reads only the positions
    # its window reaches, the way attention does.
    windows: tuple = (None,)
    reqs: dict[str, _ReqState] = field(default_factory=dict)
    # (group, slot) -> token id written there; one cache tensor per group.
    kv: dict[tuple[int, int], int] = field(default_factory=dict)

    def _slot(self, state: _ReqState, pos: int, group: int = 0) -> tuple[int, int]:
        block = state.block_ids[group][pos // self.block_size]
        return group, block * self.block_size + pos % self.block_size

    def _check_windows(self, state: _ReqState, first_query: int, end: int) -> None:
        """Every key the step's queries (positions first_query .. end - 1) attend, through
        every group's blocks, holds the sequence's token (none overwritten by another
        request after a block was given back too early)."""
        for g, window in enumerate(self.windows):
            start = 0 if window is None else max(0, first_query - window + 1)
            got = [self.kv[self._slot(state, pos, g)] for pos in range(start, end)]
            assert got == state.tokens[start:end], f"group {g} lost KV of {state.tokens}"

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.reqs.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.reqs, "new request data sent twice"
            tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
            self.reqs[new.req_id] = _ReqState(tokens, tuple(list(t) for t in new.block_ids),
                                              new.num_computed_tokens, list(tokens))
        for cached in out.scheduled_cached_reqs:
            state = self.reqs[cached.req_id]
            assert state.num_computed == cached.num_computed_tokens
            for table, ids in zip(state.block_ids, cached.new_block_ids):
                table.extend(ids)
            # The scheduler sends each sampled token once, in order, as sampled.
            state.sent.extend(cached.new_token_ids)
            assert state.sent == state.tokens[:len(state.sent)], (state.sent, state.tokens)
        assert len(set(out.num_scheduled_tokens)) == len(out.num_scheduled_tokens)
        req_ids, sampled = [], []
        for req_id, num in out.num_scheduled_tokens.items():
            state = self.reqs[req_id]
            end = state.num_computed + num
            assert end <= len(state.tokens)
            # Every input token was sent, but for one placeholder (async: still on the device).
            assert end <= len(state.sent) + 1, (req_id, end, len(state.sent))
            for g, table in enumerate(state.block_ids):
                assert len(table) * self.block_size >= end, "too few blocks"
                for pos in range(state.num_computed, end):
                    self.kv[self._slot(state, pos, g)] = state.tokens[pos]
            self._check_windows(state, state.num_computed, end)
            state.num_computed = end
            new_tokens = []
            if end == len(state.tokens):
                seen = state.tokens[:end] if self.windows[0] is not None else [
                    self.kv[self._slot(state, pos)] for pos in range(end)]
                new_tokens = [self.next_token(seen)]
                state.tokens.extend(new_tokens)
            req_ids.append(req_id)
            sampled.append(new_tokens)
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    max_model_len: int = 256,
    enable_chunked_prefill: bool = True,
    enable_prefix_caching: bool = True,
    policy: str = "fcfs",
    kv_cache_windows: tuple = (None,),
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len,
                             enable_chunked_prefill, policy)
    cache = CacheConfig(block_size, enable_prefix_caching, kv_cache_memory=None,
                        num_kv_blocks=None, gpu_memory_utilization=0.9)
    return Scheduler(config, cache, num_blocks, kv_cache_windows=kv_cache_windows)


def make_request(req_id: str, prompt: list[int], arrival: float = 0.0, priority: int = 0,
                 eos: Optional[int] = None, **params: object) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(req_id, prompt, SamplingParams(**params), eos_token_id=eos,
                   arrival_time=arrival, priority=priority)


@dataclass
class RunResult:
    tokens: dict[str, list[int]]
    finished: dict[str, EngineCoreOutput]
    steps: list[SchedulerOutput]
    num_preemptions: int


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 2000,
                      ) -> RunResult:
    tokens: dict[str, list[int]] = defaultdict(list)
    finished: dict[str, EngineCoreOutput] = {}
    steps, num_preemptions = [], 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        assert out.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        assert len(out.num_scheduled_tokens) <= scheduler.config.max_num_seqs
        steps.append(out)
        result = scheduler.update_from_output(out, runner.execute(out))
        assert result.scheduler_stats is not None
        num_preemptions += result.scheduler_stats.num_preemptions
        for output in result.outputs:
            tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                finished[output.request_id] = output
        assert len(steps) < max_steps, "scheduler made no progress"
    return RunResult(dict(tokens), finished, steps, num_preemptions)
