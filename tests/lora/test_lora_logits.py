"""Our model with peft adapters in device slots gives peft's merged model's logits: one
adapter in one step and in chunks over the paged cache, a mixed batch of adapters and the
base model in one forward, and slots reused when more adapters than slots come and go."""

from __future__ import annotations

import pytest
import torch

from engine.config import LoRAConfig
from engine.models.layers.linear import Linear
from tests.lora.conftest import (
    ALL_TARGETS,
    build_lora_model,
    hf_logits,
    make_adapter,
    random_hf_model,
    request,
    run_prompt,
    run_step,
    tiny_llama_config,
)

CASES = {
    "r4-attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                            "o_proj"]),
    "r8-all": dict(r=8, lora_alpha=16, target_modules=ALL_TARGETS),
    "r16-all-rslora": dict(r=16, lora_alpha=8, target_modules=ALL_TARGETS, use_rslora=True),
    # peft's other form: one regex over module names (here only some of q/k/v, and down)
    "r4-regex": dict(r=4, lora_alpha=4, target_modules=r".*\.(q_proj|v_proj|down_proj)"),
}


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_adapter_equals_peft_merged_in_one_step_and_in_chunks(case, base_dir, tmp_path):
    merged = make_adapter(base_dir, tmp_path, **CASES[case])
    bound = build_lora_model(base_dir, LoRAConfig(max_loras=2, max_lora_rank=16))
    lora = request(1, tmp_path)
    ids = prompt(37, 0)
    expected = hf_logits(merged, ids)
    base = hf_logits(random_hf_model(tiny_llama_config()), ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the logits
    assert_close(run_prompt(bound, ids, lora), expected)
    # Chunked prefill: 20 tokens (across a block), 16, then 1 reading the cache.
    assert_close(run_prompt(bound, ids, lora, chunks=[20, 16, 1]), expected)


def test_a_mixed_batch_equals_each_request_alone(base_dir, tmp_path):
    merged_a = make_adapter(base_dir, tmp_path / "a", seed=1, **CASES["r8-all"])
    merged_b = make_adapter(base_dir, tmp_path / "b", seed=2, **CASES["r4-attention"])
    base = random_hf_model(tiny_llama_config())
    bound = build_lora_model(base_dir, LoRAConfig(max_loras=2, max_lora_rank=16))
    a, b = request(1, tmp_path / "a"), request(2, tmp_path / "b")
    ids_a, ids_base, ids_b = prompt(21, 1), prompt(9, 2), prompt(30, 3)
    # Three requests in disjoint blocks, one forward: adapter a, the base model, adapter b.
    got = run_step(bound, [([1, 2], 0, ids_a), ([3], 0, ids_base), ([4, 5], 0, ids_b)],
                   [a, None, b])
    assert_close(got[0], hf_logits(merged_a, ids_a))
    assert_close(got[1], hf_logits(base, ids_base))
    assert_close(got[2], hf_logits(merged_b, ids_b))
    # A decode step of the same requests, mixed again, reading their cached prefixes.
    nxt = [prompt(1, 10 + i) for i in range(3)]
    step = run_step(bound, [([1, 2], 21, nxt[0]), ([3], 9, nxt[1]), ([4, 5], 30, nxt[2])],
                    [a, None, b])
    for logits, merged, ids, extra in zip(step, (merged_a, base, merged_b),
                                          (ids_a, ids_base, ids_b), nxt):
        assert_close(logits[0], hf_logits(merged, torch.cat([ids, extra]))[-1])


def test_base_model_steps_match_a_model_without_lora(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path, **CASES["r8-all"])
    plain = build_lora_model(base_dir, None)
    assert all(m.lora is None for m in plain.model.modules() if isinstance(m, Linear))
    bound = build_lora_model(base_dir, LoRAConfig(max_loras=1, max_lora_rank=8))
    assert all(m.lora is not None for m in bound.model.modules() if isinstance(m, Linear))
    bound.manager.slot_of(request(1, tmp_path))  # an adapter on the device, unused below
    ids = prompt(19, 4)
    torch.testing.assert_close(run_prompt(bound, ids, None), run_prompt(plain, ids, None))
    assert not bound.manager.context.is_active


def test_slots_are_reused_least_recently_used_first(base_dir, tmp_path):
    merged = {}
    for i, case in enumerate(["r16-all-rslora", "r8-all", "r4-attention"], start=1):
        merged[i] = make_adapter(base_dir, tmp_path / str(i), seed=i, **CASES[case])
    bound = build_lora_model(base_dir, LoRAConfig(max_loras=2, max_lora_rank=16,
                                                  max_cpu_loras=2))
    manager = bound.manager
    loras = {i: request(i, tmp_path / str(i)) for i in merged}
    ids = prompt(17, 5)
    assert_close(run_prompt(bound, ids, loras[1]), hf_logits(merged[1], ids))
    assert_close(run_prompt(bound, ids, loras[2]), hf_logits(merged[2], ids))
    assert manager.device_ids == [1, 2]
    # Adapter 3 (rank 4) takes adapter 1's slot (rank 16): what it leaves must not remain.
    assert_close(run_prompt(bound, ids, loras[3]), hf_logits(merged[3], ids))
    assert manager.device_ids == [2, 3] and manager.host_ids == [2, 3]
    # 1 comes back (read again: host memory holds two) into 2's slot; 3 stays.
    got = run_step(bound, [([1, 2], 0, ids), ([3, 4], 0, ids)], [loras[1], loras[3]])
    assert_close(got[0], hf_logits(merged[1], ids))
    assert_close(got[1], hf_logits(merged[3], ids))
    assert manager.device_ids == [1, 3]  # used this step, in request order
    # A step with three distinct adapters cannot fit in two slots.
    manager.begin_step()
    manager.slot_of(loras[1])
    manager.slot_of(loras[3])
    with pytest.raises(ValueError, match="more than max_loras=2"):
        manager.slot_of(loras[2])
    # remove(): the slot is free again and the adapter forgotten.
    assert manager.remove(1) and not manager.remove(1)
    assert manager.device_ids == [3]
    manager.begin_step()
    assert manager.slot_of(loras[2]) not in (None, manager.slot_of(loras[3]))
