"""The worker's persistent view of the running requests, and the flat inputs of one step.

Rule: request state crosses from the scheduler once and lives here; every step applies the
scheduler's deltas (new blocks, the output tokens it learned, where the step starts,
finished ids) and keeps no count of its own. A scheduled position past the tokens this
worker was sent is a placeholder: its value is the one this worker's last step sampled,
still on the device.
Inputs are built on the host with numpy (no per-token Python loops) and copied to the
device once per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from engine.messages.core import LoRARequest
from engine.messages.step import SchedulerOutput
from engine.sampling_params import SamplingParams
from engine.worker.sampling_metadata import check_vocab_range
from platforms.interface import CommonAttentionMetadata
from platforms.util import cdiv


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: Optional[int]
    block_ids: tuple[list[int], ...]  # per KV-cache group
    num_computed_tokens: int
    lora_request: Optional[LoRARequest] = None  # None: the base model
    # Prompt logprobs gathered so far are sent as they are computed; nothing kept here.
    token_ids_np: np.ndarray = field(init=False)  # prompt + output, grows on demand
    num_tokens: int = field(init=False)  # known on the host (sent by the scheduler)

    def __post_init__(self) -> None:
        tokens = self.prompt_token_ids + self.output_token_ids
        self.token_ids_np = np.zeros(max(len(tokens) * 2, 64), dtype=np.int64)
        self.token_ids_np[: len(tokens)] = tokens
        self.num_tokens = len(tokens)

    def append_token(self, token_id: int) -> None:
        if self.num_tokens == len(self.token_ids_np):
            self.token_ids_np = np.concatenate([self.token_ids_np, np.zeros_like(self.token_ids_np)])
        self.token_ids_np[self.num_tokens] = token_id
        self.num_tokens += 1
        self.output_token_ids.append(token_id)


def _stand_in(state: CachedRequestState) -> CachedRequestState:
    """The same request with inputs that are safe to run: token 0 everywhere, greedy."""
    return CachedRequestState(
        req_id=state.req_id,
        prompt_token_ids=[0] * len(state.prompt_token_ids),
        output_token_ids=[0] * len(state.output_token_ids),
        sampling_params=SamplingParams(temperature=0.0),
        eos_token_id=None,
        block_ids=state.block_ids,
        num_computed_tokens=state.num_computed_tokens,
    )


@dataclass(frozen=True)
class StepInputs:
    """Flat inputs of one step, already on the device."""

    req_ids: list[str]
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: CommonAttentionMetadata  # KV-cache group 0's (block table and slot mapping)
    # Every group's, in group order (attn_groups[0] is attn): the same requests and
    # lengths, each group's own block table and slot mapping.
    attn_groups: tuple[CommonAttentionMetadata, ...]
    # Requests that reach the end of their known tokens this step sample one token each.
    sample_req_idx: list[int]  # indexes into req_ids
    sample_token_idx: torch.Tensor  # [len(sample_req_idx)] int64: their last token's row
    # Tokens whose value is still on the device (async scheduling): input rows to fill, and
    # the rows of the last step's sampled tensor to fill them from.
    pending_dst: Optional[torch.Tensor]
    pending_src: Optional[torch.Tensor]
    query_start_loc_np: np.ndarray  # [num_reqs + 1] host copy
    start_positions_np: np.ndarray  # [num_reqs] host: first position computed this step
    # [num_reqs] host: placeholder tokens (values on the device) among each request's own
    num_placeholders_np: np.ndarray


# Every per-step array uploaded to the device starts at a multiple of this many bytes.
_VIEW_ALIGN_BYTES = 16


class InputBatch:
    """All requests the worker currently knows, keyed by id."""

    def __init__(self, block_size: int, device: torch.device, pin_memory: bool = False,
                 vocab_size: Optional[int] = None) -> None:
        self.block_size = block_size
        # Token ids outside [0, vocab_size) would index past the embedding or the logits.
        self.vocab_size = vocab_size
        self.device = device
        # Staging in page-locked host memory lets the step's inputs go up in two asynchronous
        # copies instead of seven blocking ones (the platform says whether it has such memory).
        self.pin_memory = pin_memory
        self.requests: dict[str, CachedRequestState] = {}

    def update(self, out: SchedulerOutput) -> dict[str, str]:
        """Apply the scheduler's deltas: forget finished/preempted, add new, extend blocks.

        Returns {req_id: why} for new requests this worker cannot serve. They stay in the
        batch this step with stand-in inputs (token 0, greedy), so the step's shapes match
        what the scheduler decided and nothing indexes out of bounds; the scheduler then
        finishes them with an error."""
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.requests.pop(req_id, None)
        failed: dict[str, str] = {}
        for new in out.scheduled_new_reqs:
            state = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids),
                sampling_params=new.sampling_params,
                eos_token_id=new.eos_token_id,
                block_ids=tuple(list(ids) for ids in new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                lora_request=new.lora_request,
            )
            problem = self._problem(state)
            if problem is not None:
                failed[new.req_id] = problem
                state = _stand_in(state)
            self.requests[new.req_id] = state
        for cached in out.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            for table, ids in zip(state.block_ids, cached.new_block_ids):
                table.extend(ids)
            for token_id in cached.new_token_ids:
                state.append_token(token_id)
            state.num_computed_tokens = cached.num_computed_tokens
        return failed

    def _problem(self, state: CachedRequestState) -> Optional[str]:
        """Why this worker cannot run `state`, or None (the API checks the same at
        admission; this guards every other way in)."""
        if self.vocab_size is None:
            return None
        tokens = state.token_ids_np[: state.num_tokens]
        bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)]
        if bad.size:
            return (f"token id {int(bad[0])} is outside the vocabulary [0, "
                    f"{self.vocab_size}).")
        try:
            check_vocab_range(state.sampling_params, self.vocab_size)
        except ValueError as exc:
            return str(exc)
        return None

    def prepare(self, out: SchedulerOutput,
                last_sample_row: Optional[dict[str, int]] = None) -> StepInputs:
        """The step's flat inputs. `last_sample_row`: {req_id: row} of the previous step's
        sampled tensor, where a request's one pending token (if it has one) is."""
        req_ids = list(out.num_scheduled_tokens)
        num_reqs = len(req_ids)
        states = [self.requests[r] for r in req_ids]
        counts = np.fromiter((out.num_scheduled_tokens[r] for r in req_ids), np.int64, num_reqs)
        starts = np.fromiter((s.num_computed_tokens for s in states), np.int64, num_reqs)
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])

        # positions: for each request, starts[i] .. starts[i] + counts[i] - 1, flattened.
        req_of_token = np.repeat(np.arange(num_reqs), counts)
        positions = np.arange(num_tokens) - query_start_loc[req_of_token] + starts[req_of_token]
        input_ids = np.empty(num_tokens, dtype=np.int64)
        max_blocks = 1
        pending_dst: list[int] = []
        pending_src: list[int] = []
        for i, state in enumerate(states):
            lo, hi = query_start_loc[i], query_start_loc[i + 1]
            end = starts[i] + counts[i]
            if end > state.num_tokens:  # the last token is the previous step's sample
                if end != state.num_tokens + 1 or last_sample_row is None \
                        or state.req_id not in last_sample_row:
                    raise RuntimeError(
                        f"Request {state.req_id!r} is scheduled up to position {end} but "
                        f"only {state.num_tokens} tokens are known and none is pending from "
                        "the last step (a scheduler/worker mismatch).")
                hi -= 1
                input_ids[hi] = 0
                pending_dst.append(int(hi))
                pending_src.append(last_sample_row[state.req_id])
                end -= 1
            input_ids[lo:hi] = state.token_ids_np[starts[i] : end]
            max_blocks = max(max_blocks, max(len(t) for t in state.block_ids))
        num_groups = len(states[0].block_ids) if states else 1
        block_tables = np.zeros((num_groups, num_reqs, max_blocks), dtype=np.int32)
        for i, state in enumerate(states):
            for g, table in enumerate(state.block_ids):
                block_tables[g, i, : len(table)] = table
        token_blocks = positions // self.block_size
        slot_mappings = (
            block_tables[:, req_of_token, token_blocks].astype(np.int64) * self.block_size
            + positions % self.block_size
        )  # [num_groups, num_tokens]
        seq_lens = starts + counts
        # A request samples when the step reaches the end of its tokens, placeholder included.
        num_known = np.fromiter((s.num_tokens for s in states), np.int64, num_reqs)
        sample_req_idx = np.nonzero(seq_lens >= num_known)[0]

        sample_token_idx = query_start_loc[1:][sample_req_idx] - 1
        num_pending = len(pending_dst)
        ids_d, positions_d, sample_d, pending_d, *slots_d = self._upload(
            [input_ids, positions, sample_token_idx,
             np.asarray(pending_dst + pending_src, dtype=np.int64), *slot_mappings], np.int64)
        qsl32, seq32 = query_start_loc.astype(np.int32), seq_lens.astype(np.int32)
        qsl_d, seq_lens_d, *tables_d = self._upload(
            [qsl32, seq32, *(table.ravel() for table in block_tables)], np.int32)
        first = CommonAttentionMetadata(
            num_reqs=num_reqs,
            num_actual_tokens=num_tokens,
            max_query_len=int(counts.max()) if num_reqs else 0,
            max_seq_len=int(seq_lens.max()) if num_reqs else 0,
            query_start_loc_cpu=torch.from_numpy(qsl32),
            seq_lens_cpu=torch.from_numpy(seq32),
            num_computed_tokens_cpu=torch.from_numpy(starts.astype(np.int32)),
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            block_table=tables_d[0].view(num_reqs, max_blocks),
            slot_mapping=slots_d[0],
        )
        groups = (first, *(
            dataclasses.replace(first, block_table=table.view(num_reqs, max_blocks),
                                slot_mapping=slots)
            for table, slots in zip(tables_d[1:], slots_d[1:])))
        return StepInputs(
            req_ids=req_ids,
            input_ids=ids_d,
            positions=positions_d,
            attn=first,
            attn_groups=groups,
            sample_req_idx=sample_req_idx.tolist(),
            sample_token_idx=sample_d,
            pending_dst=pending_d[:num_pending] if num_pending else None,
            pending_src=pending_d[num_pending:] if num_pending else None,
            query_start_loc_np=query_start_loc,
            start_positions_np=starts,
            num_placeholders_np=np.maximum(seq_lens - num_known, 0),
        )

    def _upload(self, arrays: list[np.ndarray], dtype: type) -> list[torch.Tensor]:
        """The arrays on the device, as views of one buffer sent in one copy.

        Each view starts on a 16-byte boundary (the buffer is padded between arrays): kernel
        compilers specialise on pointer alignment (Triton does), so views whose alignment
        followed the step's request count made the same kernel compile again mid-run for
        each new alignment pattern."""
        align = max(1, _VIEW_ALIGN_BYTES // np.dtype(dtype).itemsize)
        sizes = [a.size for a in arrays]
        padded = [cdiv(n, align) * align for n in sizes]
        flat = np.zeros(sum(padded), dtype=dtype)
        offset = 0
        for array, size, room in zip(arrays, sizes, padded):
            flat[offset : offset + size] = array.ravel()
            offset += room
        host = torch.from_numpy(flat)
        if self.pin_memory:
            staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            host = staged.copy_(host)
        views = host.to(self.device, non_blocking=True).split(padded)
        return [view[:size] for view, size in zip(views, sizes)]
