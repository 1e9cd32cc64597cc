"""The CUDA platform's attention backend: Triton paged attention over the shared KV layout.

Rule: one step = one KV write kernel + one attention launch (+ a merge kernel for split
decode), whatever the mix of prefill chunks and decodes; metadata holds device tensors and
python ints only, so `forward` never synchronises with the host. While the CUDA graph runner
captures, it sets `capture_hook`, through which every attention call of the model then goes
(the runner was handed these backends by the model runner: see `GraphRunner.attention`).
The spec's sliding window and logits soft-cap are constexpr switches of the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from engine_cuda.ops.attention import (
    H100_NUM_SMS,
    choose_num_splits,
    paged_attention,
    windowed_len,
)
from engine_cuda.ops.kv_cache import write_kv
from platforms.interface import AttentionBackend, AttentionSpec, CommonAttentionMetadata


@dataclass(frozen=True)
class TritonAttentionMetadata:
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int  # python ints: they pick the launch shape, no device read
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor  # [num_reqs] int32, device
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, device
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64, device
    num_splits: Optional[int]  # decode context slices; None lets the kernel choose


class TritonAttentionBackend(AttentionBackend):
    """KV cache layout: [2, num_blocks, block_size, num_kv_heads, head_size] (as on CPU)."""

    name = "triton_paged"

    def __init__(self, spec: AttentionSpec, num_sms: int = H100_NUM_SMS) -> None:
        super().__init__(spec)
        self.num_sms = num_sms
        # Set by the graph runner while it captures: called instead of `run` with this
        # backend and the call's arguments (None: attention runs as is).
        self.capture_hook: Optional[Callable[..., torch.Tensor]] = None

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, num_blocks, s.block_size, s.num_kv_heads, s.head_size)

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        # With a window a query reads at most W keys: slices are sized by that.
        num_splits = choose_num_splits(
            common.num_reqs, self.spec.num_kv_heads,
            windowed_len(common.max_seq_len, self.spec.sliding_window), self.num_sms)
        return TritonAttentionMetadata(
            num_reqs=common.num_reqs,
            num_actual_tokens=common.num_actual_tokens,
            max_query_len=common.max_query_len,
            max_seq_len=common.max_seq_len,
            query_start_loc=common.query_start_loc,
            seq_lens=common.seq_lens,
            block_table=common.block_table,
            slot_mapping=common.slot_mapping,
            num_splits=num_splits,
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: TritonAttentionMetadata,
                scale: float) -> torch.Tensor:
        hook = self.capture_hook
        if hook is not None:
            return hook(self, query, key, value, kv_cache, metadata, scale)
        return self.run(query, key, value, kv_cache, metadata, scale)

    def run(
        self,
        query: torch.Tensor,  # [T, H, D], T >= num_actual_tokens (padded rows allowed)
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TritonAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]; padded rows are zeros
        """Write the new keys/values, then attend (what `forward` does outside a capture)."""
        num_tokens = metadata.num_actual_tokens
        write_kv(key, value, kv_cache, metadata.slot_mapping[:num_tokens])
        out = torch.empty_like(query)
        if query.shape[0] > num_tokens:
            out[num_tokens:].zero_()  # padding rows: finite, whatever runs after us
        return paged_attention(
            query, kv_cache, out, metadata.query_start_loc, metadata.seq_lens,
            metadata.block_table, scale, metadata.max_query_len, metadata.max_seq_len,
            num_splits=metadata.num_splits, num_sms=self.num_sms,
            sliding_window=self.spec.sliding_window, logits_soft_cap=self.spec.logits_soft_cap,
        )
