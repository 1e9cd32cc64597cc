"""Helpers for model tests: build attention metadata by hand for one request, bind KV caches,
and run our model over a prompt in one piece or in chunks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.config import ModelConfig
from engine.models.layers.attention import Attention
from engine.models.loader.model_loader import load_model
from platforms.cpu.platform import CpuPlatform
from platforms.interface import AttentionSpec, CommonAttentionMetadata

BLOCK_SIZE = 16


def build_model(model_config: ModelConfig, dtype: torch.dtype = torch.float32):
    """Our model for `model_config` on CPU, plus its attention backend (every layer bound to
    it: models with one kind of attention layer)."""
    cfg = model_config.hf_config
    spec = AttentionSpec(cfg.num_attention_heads, model_config.num_kv_heads,
                         model_config.head_dim, dtype, BLOCK_SIZE)
    backend = CpuPlatform().attention_backend(spec)
    model = load_model(model_config, "cpu", dtype)
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.backend = backend
    return model, backend


def bind_kv_caches(model: torch.nn.Module, backend, num_blocks: int) -> int:
    """A fresh zeroed cache for every Attention layer, in model order; returns the count."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.kv_cache = torch.zeros(backend.kv_cache_shape(num_blocks),
                                     dtype=backend.spec.dtype)
    return len(layers)


def one_request_metadata(backend, block_ids: list[int], num_computed: int, num_new: int):
    """Metadata of a step with one request: tokens num_computed .. num_computed+num_new-1,
    its sequence stored in `block_ids` (a deliberately non-contiguous table)."""
    seq_len = num_computed + num_new
    qsl = torch.tensor([0, num_new], dtype=torch.int32)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    table = torch.tensor([block_ids], dtype=torch.int32)
    positions = torch.arange(num_computed, seq_len)
    slots = table[0, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    common = CommonAttentionMetadata(
        num_reqs=1, num_actual_tokens=num_new, max_query_len=num_new, max_seq_len=seq_len,
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
        num_computed_tokens_cpu=torch.tensor([num_computed], dtype=torch.int32),
        query_start_loc=qsl, seq_lens=seq_lens, block_table=table, slot_mapping=slots,
    )
    return backend.build_metadata(common), positions


def run_prompt(model, backend, input_ids: torch.Tensor, chunks: list[int] | None = None
               ) -> torch.Tensor:
    """float32 logits [T, V] of every prompt position; `chunks` splits the prompt into steps
    that share the cache (the later ones have num_computed > 0)."""
    num_tokens = len(input_ids)
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    block_ids = list(range(num_blocks + 2, 1, -1))[:num_blocks]  # reversed, offset ids
    bind_kv_caches(model, backend, num_blocks + 3)
    sizes = chunks or [num_tokens]
    logits, start = [], 0
    with torch.no_grad():
        for size in sizes:
            metadata, positions = one_request_metadata(backend, block_ids, start, size)
            hidden = model(input_ids[start:start + size], positions, metadata)
            logits.append(model.compute_logits(hidden))
            start += size
    return torch.cat(logits)


@pytest.fixture
def prompt_runner() -> Callable[..., torch.Tensor]:
    return run_prompt


@pytest.fixture
def model_builder() -> Callable[..., tuple]:
    return build_model
