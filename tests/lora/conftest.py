"""Helpers for the LoRA tests: a random-weight tiny Llama, random peft adapters made by peft
itself (and peft's merged model as the reference), our model with a LoRAManager bound by
hand over a CPU attention backend, and a step of several requests built by hand."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.config import LoRAConfig
from engine.engine_args import EngineArgs
from engine.lora import LoRAManager
from engine.messages.core import LoRARequest
from engine.models.layers.attention import Attention
from engine.models.loader.model_loader import load_model
from platforms import kernels
from platforms.cpu.platform import CpuPlatform
from platforms.interface import AttentionSpec, CommonAttentionMetadata

BLOCK_SIZE = 16
VOCAB = 128
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(intermediate_size: int = 128) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate_size,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=False)


def random_hf_model(config: LlamaConfig, seed: int = 0):
    """Every parameter random (norm scales near 1), float32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("base")
    random_hf_model(tiny_llama_config()).save_pretrained(directory)
    return directory


def make_adapter(base: pathlib.Path, directory: pathlib.Path, seed: int = 1,
                 **lora_kwargs) -> torch.nn.Module:
    """A random peft adapter of the model in `base`, saved to `directory`; returns peft's
    merged model (the reference). lora_B is scaled up so the adapter moves the logits."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn_like(param))
    peft_model.save_pretrained(directory)
    return peft_model.merge_and_unload().eval()


def edit_adapter_config(directory: pathlib.Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids[None]).logits[0].float()


def request(lora_int_id: int, path: pathlib.Path) -> LoRARequest:
    return LoRARequest(lora_name=f"adapter-{lora_int_id}", lora_int_id=lora_int_id,
                       lora_path=str(path))


@pytest.fixture(autouse=True)
def lora_ops(monkeypatch):
    """The reference table's LoRA ops; a stand-in with their documented semantics only
    while platforms/kernels.py does not have them yet."""
    if "lora_shrink" in kernels.REFERENCE:
        return
    monkeypatch.setitem(kernels.REFERENCE, "lora_shrink", _shrink)
    monkeypatch.setitem(kernels.REFERENCE, "lora_expand", _expand)
    monkeypatch.setitem(kernels.REFERENCE_TABLE.fns, "lora_shrink", _shrink)
    monkeypatch.setitem(kernels.REFERENCE_TABLE.fns, "lora_expand", _expand)


def _shrink(x, lora_a, slot_ids):
    mask = slot_ids >= 0
    a = lora_a[:, slot_ids.clamp(min=0).long()].float()  # [L, T, R, H]
    out = torch.einsum("ltrh,th->ltr", a, x.float())
    return out * mask[None, :, None]


def _expand(y, buffer, lora_b, slot_ids, slice_sizes):
    mask = slot_ids >= 0
    b = lora_b[:, slot_ids.clamp(min=0).long()].float()  # [L, T, D, R]
    offset = 0
    for index, size in enumerate(slice_sizes):
        delta = torch.einsum("tdr,tr->td", b[index, :, :size], buffer[index])
        y[:, offset:offset + size] += (delta * mask[:, None]).to(y.dtype)
        offset += size


@dataclasses.dataclass
class Bound:
    """Our model with a LoRA manager bound, its attention backend, and a KV cache."""

    model: torch.nn.Module
    backend: object
    manager: Optional[LoRAManager]


def build_lora_model(base: pathlib.Path, lora_config: Optional[LoRAConfig],
                     num_blocks: int = 32) -> Bound:
    model_config = EngineArgs(model=str(base)).create_config().model
    cfg = model_config.hf_config
    spec = AttentionSpec(cfg.num_attention_heads, model_config.num_kv_heads,
                         model_config.head_dim, torch.float32, BLOCK_SIZE)
    backend = CpuPlatform().attention_backend(spec)
    with kernels.use_kernels(kernels.REFERENCE_TABLE):
        model = load_model(model_config, "cpu", torch.float32)
        manager = None if lora_config is None else LoRAManager(
            model, lora_config, torch.device("cpu"), torch.float32, max_num_tokens=256)
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.backend = backend
            layer.kv_cache = torch.zeros(backend.kv_cache_shape(num_blocks))
    return Bound(model, backend, manager)


def run_step(bound: Bound, reqs: list[tuple[list[int], int, torch.Tensor]],
             loras: list[Optional[LoRARequest]]) -> list[torch.Tensor]:
    """One forward over several requests: each (block ids, tokens computed before, new token
    ids) with its adapter (None: the base model). Logits [n_i, V] per request."""
    counts = [len(ids) for _, _, ids in reqs]
    starts = [start for _, start, _ in reqs]
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32)
    seq_lens = torch.tensor([s + n for s, n in zip(starts, counts)], dtype=torch.int32)
    width = max(len(blocks) for blocks, _, _ in reqs)
    table = torch.zeros(len(reqs), width, dtype=torch.int32)
    positions, slots = [], []
    for i, (blocks, start, ids) in enumerate(reqs):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(start, start + len(ids))
        positions.append(pos)
        slots.append(table[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    common = CommonAttentionMetadata(
        num_reqs=len(reqs), num_actual_tokens=sum(counts), max_query_len=max(counts),
        max_seq_len=int(seq_lens.max()), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
        num_computed_tokens_cpu=torch.tensor(starts, dtype=torch.int32),
        query_start_loc=qsl, seq_lens=seq_lens, block_table=table,
        slot_mapping=torch.cat(slots))
    if bound.manager is not None:
        bound.manager.set_step(loras, np.asarray(counts))
    with torch.no_grad():
        hidden = bound.model(torch.cat([ids for _, _, ids in reqs]), torch.cat(positions),
                             bound.backend.build_metadata(common))
        logits = bound.model.compute_logits(hidden)
    return list(logits.split(counts))


def run_prompt(bound: Bound, input_ids: torch.Tensor, lora: Optional[LoRARequest],
               chunks: Optional[list[int]] = None, blocks: Optional[list[int]] = None
               ) -> torch.Tensor:
    """One request's prompt logits, in one step or in `chunks` over the paged cache."""
    blocks = blocks or list(range(1, -(-len(input_ids) // BLOCK_SIZE) + 1))
    out, start = [], 0
    for size in chunks or [len(input_ids)]:
        (logits,) = run_step(bound, [(blocks, start, input_ids[start:start + size])], [lora])
        out.append(logits)
        start += size
    return torch.cat(out)
