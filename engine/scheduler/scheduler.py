"""The scheduler: every step, decide how many tokens each request computes.

Rule: there is no prefill or decode phase. A request holds `num_tokens` tokens (prompt +
output) of which `num_computed_tokens` have KV in the cache; each step it is given
`min(num_tokens - num_computed_tokens, remaining budget)` tokens (never past max_model_len).
Running requests go first, in order, then waiting ones in the policy's order. Chunked
prefill, prefix-cache hits (counted as computed) and preemption by recompute (reset to zero
computed tokens) all fall out of that one rule.

With several batches in flight (pipeline parallelism, `num_micro_batches` > 1) a request
whose batch has not come back is skipped (never in two batches at once, never preempted
while in flight), and each step takes at most 1/num_micro_batches of the requests, so the
batches in flight share them instead of one batch holding all.

Async scheduling (`async_scheduling`) is the other way to have a batch in flight: step N+1
is scheduled while step N runs, so the host's work hides behind the device's. A request in
flight may then be scheduled again: each token its batch will sample counts as a
placeholder (`num_output_placeholders`) that the next step computes on, its value fed from
the device by the worker. A request that finishes at step N has computed one token too many
at N+1, which is discarded. Requests whose sampling reads their own history (penalties)
and requests with max_tokens reached by placeholders wait for their batch instead.

LoRA: the running requests together use at most `max_loras` distinct adapters (the device
slots; a batch in flight holds its slots too). A waiting request whose adapter would be one
too many is skipped for this step and the next waiting request is tried, as vLLM V1 does;
the skipped one keeps its place at the front and goes once a running adapter's requests
are done (an endless stream of requests for the running adapters could hold it off, as in
vLLM).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache.block import KVCacheBlock
from engine.kv_cache.manager import KVCacheManager
from engine.messages.core import (
    EngineCoreOutput,
    EngineCoreOutputs,
    FinishReason,
    SchedulerStats,
)
from engine.messages.step import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from engine.scheduler.policy import create_waiting_queue
from engine.scheduler.request import Request, RequestStatus
from engine.scheduler.stop import check_stop
from platforms.scheduling import StaticBatching
from platforms.util import cdiv

logger = logging.getLogger(__name__)


@dataclass
class _Step:
    """What one `schedule()` call has decided so far."""

    budget: int
    max_reqs: int  # requests this step may take
    num_scheduled: dict[str, int] = field(default_factory=dict)
    new_reqs: list[NewRequestData] = field(default_factory=list)
    # Running requests: per KV-cache group, the ids of the blocks allocated this step.
    new_block_ids: dict[str, tuple[list[int], ...]] = field(default_factory=dict)
    preempted: set[str] = field(default_factory=set)


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
        constraints: Optional[StaticBatching] = None, num_micro_batches: int = 1,
        async_scheduling: bool = False, bitmask: Optional[Callable[[list], tuple]] = None,
        defer_bitmask: bool = False, kv_cache_windows: Sequence[Optional[int]] = (None,),
        max_loras: Optional[int] = None,
    ) -> None:
        if async_scheduling and (num_micro_batches > 1 or constraints is not None):
            raise ValueError("Async scheduling works with one micro-batch and no static "
                             "batching constraints.")
        self.config = config
        # Most distinct LoRA adapters among the running requests; None: LoRA off.
        self.max_loras = max_loras
        # Structured outputs: grammars -> (token bitmask rows, dead-end row indexes); see
        # engine.structured_outputs.manager.StructuredOutputManager.bitmask.
        self._bitmask = bitmask
        self._dead_ends: set[str] = set()  # grammars that allowed no token: end at update
        # With async scheduling: a structured request joins the next batch while its token
        # is in flight, and that batch's bitmask comes later (deferred_bitmask), once the
        # token is known, while the device runs the batch's forward pass.
        self.defer_bitmask = defer_bitmask and async_scheduling
        self.num_micro_batches = num_micro_batches
        self.async_scheduling = async_scheduling
        # Scheduled, output not back yet: {req_id: batches in flight holding it}.
        self._in_flight: Counter[str] = Counter()
        # The platform's shape limits (None: any step the budget allows).
        self.constraints = constraints
        self.block_size = cache_config.block_size
        # One block table per KV-cache group (their windows: None for full attention).
        self.kv_cache = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching,
            kv_cache_windows,
        )
        self.waiting = create_waiting_queue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Finished or aborted since the last schedule(): the worker must forget them.
        self._finished_req_ids: set[str] = set()
        # Outputs for requests finished inside schedule() (see _finish_unfittable).
        self._pending_outputs: list[EngineCoreOutput] = []
        self._num_preemptions = 0
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0

    # ---- requests in and out ------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError if its prompt can never be scheduled."""
        if request.request_id in self.requests:
            raise ValueError(f"Request id {request.request_id!r} is already in the scheduler.")
        if request.lora_request is not None and self.max_loras is None:
            raise ValueError(f"Request {request.request_id!r} asks for LoRA adapter "
                             f"{request.lora_request.lora_name!r} but LoRA is off; start the "
                             "engine with --enable-lora (enable_lora=True).")
        limit = self.config.max_model_len
        if request.num_tokens > limit:
            raise ValueError(
                f"Prompt of request {request.request_id!r} has {request.num_tokens} tokens, "
                f"more than max_model_len={limit}; shorten it or raise --max-model-len."
            )
        num_blocks_needed = self.kv_cache.max_blocks_needed(
            request.num_tokens, self.config.max_num_batched_tokens
            if self.config.enable_chunked_prefill else None)
        if num_blocks_needed > self.kv_cache.num_blocks:
            raise ValueError(
                f"Prompt of request {request.request_id!r} needs {num_blocks_needed} KV-cache "
                f"blocks but only {self.kv_cache.num_blocks} exist; raise --num-kv-blocks or "
                "--kv-cache-memory."
            )
        if self.constraints is not None:
            self._check_static_fit(request)
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and request.num_tokens > budget:
            raise ValueError(
                f"Prompt of request {request.request_id!r} has {request.num_tokens} tokens, "
                f"more than max_num_batched_tokens={budget} with chunked prefill off; raise "
                "--max-num-batched-tokens or enable chunked prefill."
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(
        self, request_ids: Union[str, Iterable[str]], status: RequestStatus
    ) -> None:
        """End requests from outside (abort): free their blocks and forget them."""
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}.")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        removed_waiting = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue  # already finished or never known: nothing to do
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                removed_waiting.append(request)
            request.status = status
            self._release(request)
        if removed_waiting:
            self.waiting.remove(removed_waiting)

    def _release(self, request: Request) -> None:
        self.kv_cache.free(request)
        del self.requests[request.request_id]
        self._dead_ends.discard(request.request_id)
        self._finished_req_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- schedule -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """One step's decision; advances num_computed_tokens of scheduled requests
        optimistically, as if the step had already run."""
        share = min(len(self.requests), self.config.max_num_seqs)
        step = _Step(budget=self.config.max_num_batched_tokens,
                     max_reqs=max(1, cdiv(share, self.num_micro_batches)))
        self._schedule_running(step)
        # After a preemption blocks are short: admitting more would only preempt again.
        if self.constraints is not None:
            if not self.running:  # static batches: the next one forms when this one is done
                self._schedule_static_batch(step, self.constraints)
        elif not step.preempted:
            self._schedule_waiting(step)
        structured_req_ids, grammar_bitmask, deferred = self._grammar_rows(step)
        cached_reqs = [
            CachedRequestData(r.request_id, step.new_block_ids[r.request_id],
                              r.num_computed_tokens, self._unsent_tokens(r))
            for r in self.running
            if r.request_id in step.new_block_ids
        ]
        output = SchedulerOutput(
            scheduled_new_reqs=step.new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=step.num_scheduled,
            total_num_scheduled_tokens=sum(step.num_scheduled.values()),
            finished_req_ids=self._finished_req_ids,
            preempted_req_ids=step.preempted,
            structured_req_ids=structured_req_ids,
            grammar_bitmask=grammar_bitmask,
            grammar_deferred=deferred,
        )
        self._finished_req_ids = set()
        for req_id, num_tokens in step.num_scheduled.items():
            request = self.requests[req_id]
            request.num_computed_tokens += num_tokens
            if request.num_computed_tokens >= request.num_tokens:  # this step samples
                request.num_output_placeholders += 1
        self._in_flight.update(step.num_scheduled.keys())  # count batches, not tokens
        return output

    def _grammar_rows(self, step: _Step) -> tuple[list[str], Optional[Any], bool]:
        """The structured requests that sample this step, their token bitmask, and whether
        it is deferred (None until `deferred_bitmask`)."""
        if self._bitmask is None:
            return [], None, False
        rows = []
        for req_id, n in step.num_scheduled.items():
            request = self.requests[req_id]
            if request.grammar is not None and request.num_computed_tokens + n >= request.num_tokens:
                rows.append(request)
        if not rows:
            return [], None, False
        if self.defer_bitmask and any(r.num_output_placeholders for r in rows):
            return [r.request_id for r in rows], None, True  # its tokens are in flight
        return [r.request_id for r in rows], self._fill_bitmask(rows), False

    def _fill_bitmask(self, rows: list[Optional[Request]]) -> Any:
        """Bitmask rows of `rows`' grammars; a row without one (a request that ended while
        its step was in flight) allows any token, as does a dead end, whose request then
        ends at its update (stop) with that sample discarded (the row's logits stay
        finite)."""
        assert self._bitmask is not None
        grammars = [r.grammar if r is not None and not r.is_finished else None for r in rows]
        bitmask, dead = self._bitmask(grammars)
        for i in dead:
            bitmask[i] = -1
            self._dead_ends.add(rows[i].request_id)  # type: ignore[union-attr]
        return bitmask

    def deferred_bitmask(self, output: SchedulerOutput) -> Any:
        """The bitmask of a step scheduled with DEFERRED, now that the tokens it waited for
        are applied (the core calls this right after the older batch's update)."""
        return self._fill_bitmask([self.requests.get(r) for r in output.structured_req_ids])

    @staticmethod
    def _unsent_tokens(request: Request) -> list[int]:
        """Output tokens the workers have not been sent yet; from now on they have."""
        new = request.output_token_ids[request.num_output_tokens_sent:]
        request.num_output_tokens_sent = request.num_output_tokens
        return new

    def _num_tokens_to_schedule(self, request: Request, num_computed: int, budget: int) -> int:
        known = request.num_tokens + request.num_output_placeholders
        return min(known - num_computed, budget, self.config.max_model_len - num_computed)

    def _waits_for_batch(self, request: Request) -> bool:
        """Whether a running request must wait for its batch in flight to come back."""
        if request.request_id not in self._in_flight:
            return False
        if not self.async_scheduling:
            return True  # pipelining: never in two batches at once
        params = request.sampling_params
        if params.uses_output_history:
            return True  # the sampler needs the token in flight
        if request.grammar is not None and not self.defer_bitmask:
            return True  # its next bitmask needs the token in flight
        # Enough tokens are on their way already (max_tokens).
        return (params.max_tokens is not None and request.num_output_tokens
                + request.num_output_placeholders >= params.max_tokens)

    def _schedule_running(self, step: _Step) -> None:
        i = 0
        while (i < len(self.running) and step.budget > 0
               and len(step.num_scheduled) < step.max_reqs):
            request = self.running[i]
            if self._waits_for_batch(request):
                i += 1
                continue
            num_new = self._num_tokens_to_schedule(request, request.num_computed_tokens,
                                                   step.budget)
            if num_new <= 0:
                i += 1
                continue
            new_blocks = self._allocate_or_preempt(request, num_new, step)
            if new_blocks is None:
                return  # it preempted itself: no blocks for anyone after it either
            step.num_scheduled[request.request_id] = num_new
            self.waiting.on_scheduled(request, num_new)
            step.budget -= num_new
            step.new_block_ids[request.request_id] = tuple(
                [b.block_id for b in blocks] for blocks in new_blocks)
            # Preempting an earlier (already scheduled) victim shifts the list.
            i = self.running.index(request) + 1

    def _allocate_or_preempt(
        self, request: Request, num_new: int, step: _Step
    ) -> Optional[tuple[list[KVCacheBlock], ...]]:
        """New blocks for `request` (per KV-cache group), preempting the policy's victims until they fit; None if
        the victim had to be `request` itself, or no request out of flight is left to
        preempt."""
        while True:
            new_blocks = self.kv_cache.allocate_slots(request, num_new)
            if new_blocks is not None:
                return new_blocks
            candidates = [r for r in self.running if r.request_id not in self._in_flight]
            if not candidates:
                return None  # every holder is in flight: wait for a batch to come back
            victim = self.waiting.select_victim(candidates)
            self._preempt(victim, step)
            if victim is request:
                return None

    def _preempt(self, victim: Request, step: _Step) -> None:
        """Free the victim's blocks; it restarts later from zero computed tokens."""
        num_undone = step.num_scheduled.pop(victim.request_id, 0)
        step.budget += num_undone
        step.new_block_ids.pop(victim.request_id, None)
        self.kv_cache.free(victim)
        self.running.remove(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.prepend(victim)
        step.preempted.add(victim.request_id)

    def _schedule_waiting(self, step: _Step) -> None:
        skipped: list[Request] = []  # their adapter would be one too many this step
        try:
            self._admit_waiting(step, skipped)
        finally:
            for request in reversed(skipped):  # back at the front, in their order
                self.waiting.prepend(request)

    def _admit_waiting(self, step: _Step, skipped: list[Request]) -> None:
        loras = self._running_loras()
        while (self.waiting and step.budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(step.num_scheduled) < step.max_reqs):
            request = self.waiting.peek()
            if self._is_one_lora_too_many(request, loras):
                skipped.append(self.waiting.pop())  # vLLM V1: try the next one this step
                continue
            hits, num_hit = self._prefix_hits(request)
            num_new = self._num_tokens_to_schedule(request, num_hit, step.budget)
            remaining = request.num_tokens - num_hit
            # Without chunking a request goes whole, unless it could never fit whole (a
            # resumed request whose outputs pushed it past the budget).
            if (not self.config.enable_chunked_prefill and num_new < remaining
                    and remaining <= self.config.max_num_batched_tokens):
                return
            new_blocks = self.kv_cache.allocate_slots(request, num_new, hits)
            if new_blocks is None:
                if not self.running:
                    self._finish_unfittable(self.waiting.pop())
                    continue
                return  # FCFS: no skipping ahead of the head of the queue
            self.waiting.pop()
            self._admit(request, num_hit, num_new, step)
            if request.lora_int_id is not None:
                loras.add(request.lora_int_id)

    def _running_loras(self) -> set[int]:
        """The adapters of the running requests: each holds its device slot while it runs."""
        return {r.lora_int_id for r in self.running if r.lora_int_id is not None}

    def _is_one_lora_too_many(self, request: Request, loras: set[int]) -> bool:
        lora_id = request.lora_int_id
        return (lora_id is not None and self.max_loras is not None and lora_id not in loras
                and len(loras) >= self.max_loras)

    def _prefix_hits(self, request: Request) -> tuple[Any, int]:
        """The request's prefix-cache hits; none for a request that wants prompt logprobs,
        whose every prompt position must be computed to give them (as vLLM does)."""
        if request.sampling_params.prompt_logprobs is not None and not request.output_token_ids:
            return None, 0
        return self.kv_cache.get_computed_blocks(request)

    def _admit(self, request: Request, num_hit: int, num_new: int, step: _Step) -> None:
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_hit
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_hit
            request.first_scheduled_time = time.time()
        request.num_output_tokens_sent = request.num_output_tokens  # all of them, below
        step.new_reqs.append(
            NewRequestData(
                req_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.sampling_params,
                block_ids=self.kv_cache.get_block_ids(request.request_id),
                num_computed_tokens=num_hit,
                eos_token_id=request.eos_token_id,
                lora_request=request.lora_request,
            )
        )
        step.num_scheduled[request.request_id] = num_new
        self.waiting.on_scheduled(request, num_new)
        step.budget -= num_new

    # ---- static batching (platforms that run only warmed-up shapes) ---------------------

    def _max_new_tokens(self, request: Request) -> int:
        max_tokens = request.sampling_params.max_tokens
        limit = self.config.max_model_len - request.num_prompt_tokens
        return limit if max_tokens is None else min(max_tokens, limit)

    def _static_blocks_needed(self, request: Request) -> int:
        return self.kv_cache.max_blocks_needed(request.num_prompt_tokens
                                               + self._max_new_tokens(request))

    def _check_static_fit(self, request: Request) -> None:
        assert self.constraints is not None
        prompt_len, max_new = request.num_prompt_tokens, self._max_new_tokens(request)
        if self.constraints.shape_for(prompt_len, max_new) is None:
            raise ValueError(self.constraints.unfit_message(request.request_id, prompt_len,
                                                            max_new))
        budget = self.config.max_num_batched_tokens
        if prompt_len > budget:
            raise ValueError(
                f"Prompt of request {request.request_id!r} has {prompt_len} tokens, more than "
                f"max_num_batched_tokens={budget}, and this platform prefills prompts whole; "
                "raise --max-num-batched-tokens."
            )
        needed = self._static_blocks_needed(request)
        if needed > self.kv_cache.num_blocks:
            raise ValueError(
                f"Request {request.request_id!r} may grow to {needed} KV-cache blocks (prompt "
                f"+ max_tokens) but only {self.kv_cache.num_blocks} exist; lower max_tokens, "
                "or raise --num-kv-blocks or --kv-cache-memory."
            )

    def _schedule_static_batch(self, step: _Step, constraints: StaticBatching) -> None:
        """Admit the next batch: whole prompts from position 0, in one warmed-up shape, with
        blocks for every member's longest sequence free before it joins."""
        if not self.waiting:
            return
        head = self.waiting.peek()
        shape = constraints.shape_for(head.num_tokens, self._max_new_tokens(head))
        if shape is None:  # grew past every shape through its outputs: it cannot resume
            self._finish_unfittable(self.waiting.pop())
            return
        free_blocks = self.kv_cache.num_free_blocks
        batch_limit = min(shape.batch_size, self.config.max_num_seqs)
        loras = self._running_loras()
        while self.waiting and len(self.running) < batch_limit:
            request = self.waiting.peek()
            needed = self._static_blocks_needed(request)
            if (not shape.fits(request.num_tokens, self._max_new_tokens(request))
                    or request.num_tokens > step.budget or needed > free_blocks
                    or self._is_one_lora_too_many(request, loras)):
                return  # no skipping ahead of the head of the queue
            if self.kv_cache.allocate_slots(request, request.num_tokens) is None:
                return
            free_blocks -= needed
            self.waiting.pop()
            self._admit(request, 0, request.num_tokens, step)
            if request.lora_int_id is not None:
                loras.add(request.lora_int_id)

    def _finish_unfittable(self, request: Request) -> None:
        """A request that does not fit even with every block free (it grew past the cache
        through its outputs) would wait forever: end it as LENGTH instead."""
        request.status = RequestStatus.FINISHED_LENGTH
        self._release(request)
        self._pending_outputs.append(
            EngineCoreOutput(request.request_id, [], finish_reason=request.status.finish_reason,
                             num_cached_tokens=request.num_cached_tokens or 0)
        )

    # ---- update -------------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> EngineCoreOutputs:
        """Append sampled tokens, run stop checks, free finished requests, report.

        Fault isolation: a request the worker could not serve, or whose update raises here,
        finishes with FinishReason.ERROR and its error; every other request goes on."""
        row_of = {req_id: i for i, req_id in enumerate(runner_output.req_ids)}
        starts = _start_positions(scheduler_output)
        outputs, self._pending_outputs = self._pending_outputs, []
        for req_id, message in runner_output.failed.items():
            self.fail_request(req_id, message)
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            self._in_flight[req_id] -= 1
            if not self._in_flight[req_id]:
                del self._in_flight[req_id]
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue  # aborted or finished after schedule(): the worker forgets it
            try:
                output = self._update_request(request, starts[req_id], num_scheduled,
                                              runner_output, row_of.get(req_id))
            except Exception as exc:  # this request's bug; the batch goes on
                logger.exception("Request %r failed in the scheduler update", req_id)
                message = f"{type(exc).__name__}: {exc}"
                if req_id in self.requests:
                    self.fail_request(req_id, message)
                else:  # it raised after its blocks were freed: still tell its client
                    outputs.append(EngineCoreOutput(req_id, [], finish_reason=FinishReason.ERROR,
                                                    error=message))
                continue
            if output is not None:
                outputs.append(output)
        outputs.extend(self._pending_outputs)  # requests failed in this update
        self._pending_outputs = []
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.make_stats())

    def _update_request(self, request: Request, start: int, num_scheduled: int,
                        runner_output: ModelRunnerOutput,
                        row: Optional[int]) -> Optional[EngineCoreOutput]:
        req_id = request.request_id
        self._count_prompt_tokens(request, start, num_scheduled)
        sampled = runner_output.sampled_token_ids[row] if row is not None else []
        request.num_output_placeholders -= len(sampled)
        if req_id in self._dead_ends:  # its grammar allows nothing more: the output ends
            self._dead_ends.discard(req_id)
            logger.warning("Request %r: its structured-output grammar allows no next token; "
                           "the output ends here.", req_id)
            sampled = []
            request.status = RequestStatus.FINISHED_STOPPED
        new_token_ids = self._append_tokens(request, sampled)
        new_logprobs = None
        if runner_output.logprobs is not None and row is not None:
            row_logprobs = runner_output.logprobs[row]
            if row_logprobs is not None:
                new_logprobs = row_logprobs[: len(new_token_ids)]
        prompt_logprobs = runner_output.prompt_logprobs.get(req_id)
        if request.is_finished:
            self.running.remove(request)
            self._release(request)
        if not (new_token_ids or prompt_logprobs or request.is_finished):
            return None
        return EngineCoreOutput(
            request_id=req_id,
            new_token_ids=new_token_ids,
            new_logprobs=new_logprobs,
            new_prompt_logprobs=prompt_logprobs,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            num_cached_tokens=request.num_cached_tokens or 0,
            first_scheduled_time=request.first_scheduled_time,
        )

    def fail_request(self, req_id: str, message: str, param: Optional[str] = None) -> None:
        """End one request with FinishReason.ERROR and `message` (one line, for its client):
        its blocks are freed and the worker forgets it; nothing else changes. `param`: the
        request's field at fault, when the request itself is (its client gets a 400)."""
        request = self.requests.get(req_id)
        if request is None or request.is_finished:
            return
        logger.error("Request %r failed: %s", req_id, message)
        self.finish_requests(req_id, RequestStatus.FINISHED_ERROR)
        self._pending_outputs.append(EngineCoreOutput(
            req_id, [], finish_reason=FinishReason.ERROR, error=message, error_param=param,
            num_cached_tokens=request.num_cached_tokens or 0,
            first_scheduled_time=request.first_scheduled_time))

    def _count_prompt_tokens(self, request: Request, start: int, num_scheduled: int) -> None:
        end = min(start + num_scheduled, request.num_prompt_tokens)
        self._num_prompt_tokens += max(0, end - start)

    def _append_tokens(self, request: Request, sampled: list[int]) -> list[int]:
        new_token_ids = []
        grammar = request.grammar
        for token_id in sampled:
            if grammar is not None and not grammar.accept_token(token_id):
                # Every token the grammar allowed was removed after the mask (min_tokens
                # hides EOS, say): nothing in the language can follow, so the output ends.
                logger.warning("Request %r: sampled token %d is outside its structured-output "
                               "grammar (no allowed token survived sampling); the output "
                               "ends here.", request.request_id, token_id)
                request.status = RequestStatus.FINISHED_STOPPED
                break
            request.append_output_token(token_id)
            new_token_ids.append(token_id)
            if check_stop(request, self.config.max_model_len):
                break
            if grammar is not None and grammar.is_terminated():
                request.status = RequestStatus.FINISHED_STOPPED  # its language is complete
                break
        self._num_generation_tokens += len(new_token_ids)
        return new_token_ids

    def make_stats(self) -> SchedulerStats:
        """Gauges now, counters since the last call (which resets them)."""
        queries, hits = self.kv_cache.take_stats()
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preemptions=self._num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
        )
        self._num_preemptions = self._num_prompt_tokens = self._num_generation_tokens = 0
        return stats

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache.reset_prefix_cache()


def _start_positions(scheduler_output: SchedulerOutput) -> dict[str, int]:
    """{req_id: first position the step computed} (num_computed_tokens when scheduled)."""
    starts = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
    starts.update((r.req_id, r.num_computed_tokens)
                  for r in scheduler_output.scheduled_cached_reqs)
    return starts
