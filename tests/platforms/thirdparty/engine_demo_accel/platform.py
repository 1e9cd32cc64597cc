"""DemoAccelPlatform: a CPU-backed platform with its own attention, runner and kernels."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from platforms.interface import (
    AttentionBackend,
    AttentionSpec,
    Capabilities,
    CommonAttentionMetadata,
    GraphRunner,
    Platform,
)
from platforms.kernels import KernelImpl


class DenseGatherAttention(AttentionBackend):
    """Cache layout [num_blocks, 2, Hkv, block_size, D]; per request, gather its blocks into
    dense K/V and run causal SDPA offset by the cached context."""

    name = "dense_gather"

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (num_blocks, 2, s.num_kv_heads, s.block_size, s.head_size)

    def forward(self, query, key, value, kv_cache, metadata: CommonAttentionMetadata, scale):
        n = metadata.num_actual_tokens
        bs = self.spec.block_size
        slots = metadata.slot_mapping[:n]
        blocks, offsets = slots // bs, slots % bs
        kv_cache[blocks, 0, :, offsets] = key[:n]
        kv_cache[blocks, 1, :, offsets] = value[:n]
        out = torch.zeros_like(query)  # padded rows stay zero
        qsl = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        group = self.spec.num_heads // self.spec.num_kv_heads
        for i in range(metadata.num_reqs):
            start, end, seq = qsl[i], qsl[i + 1], seq_lens[i]
            nblocks = -(-seq // bs)
            table = metadata.block_table[i, :nblocks].long()
            k = kv_cache[table, 0].permute(1, 0, 2, 3).reshape(self.spec.num_kv_heads, -1,
                                                               self.spec.head_size)[:, :seq]
            v = kv_cache[table, 1].permute(1, 0, 2, 3).reshape(self.spec.num_kv_heads, -1,
                                                               self.spec.head_size)[:, :seq]
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
            q = query[start:end].transpose(0, 1)  # [H, Q, D]
            qlen = end - start
            allowed = (torch.arange(seq).unsqueeze(0)
                       <= torch.arange(seq - qlen, seq).unsqueeze(1))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.to(q.device),
                                               scale=scale)
            out[start:end] = o.transpose(0, 1)
        return out


class BucketRunner(GraphRunner):
    """Pads every step to the next power-of-two token count, as a static-shape device must;
    returns rows for the real tokens only."""

    def capture(self, make_batch) -> None:
        self.captured_sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

    def __call__(self, input_ids, positions, attn_metadata):
        n = input_ids.shape[0]
        size = next((s for s in self.captured_sizes if s >= n), n)
        if size > n:
            pad = size - n
            input_ids = torch.cat((input_ids, input_ids.new_zeros(pad)))
            positions = torch.cat((positions, positions.new_zeros(pad)))
        return self.forward(input_ids, positions, attn_metadata)[:n]


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return x[..., :d] * torch.sigmoid(x[..., :d]) * x[..., d:]


class DemoAccelPlatform(Platform):
    name = "demo_accel"
    device_type = "cpu"
    priority = 3
    capabilities = Capabilities(dtypes=(torch.float32,), head_sizes=(32, 64, 128),
                                graph_capture="pads each step to a power of two tokens",
                                default_kv_cache_memory=256 * 1024**2)

    @classmethod
    def is_available(cls) -> bool:
        return os.environ.get("DEMO_ACCEL_PRESENT", "1") == "1"

    def memory_info(self) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_AVPHYS_PAGES"), page * os.sysconf("SC_PHYS_PAGES")

    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return DenseGatherAttention(spec)

    def graph_runner(self, forward, config, attention=()) -> GraphRunner:
        return BucketRunner(forward, config, attention)

    def kernel_overrides(self) -> list[KernelImpl]:
        return [KernelImpl("silu_and_mul", _silu_and_mul, priority=5, provider="engine-demo-accel",
                           platforms=frozenset({self.name}))]
