"""The torch references of the batched multi-LoRA ops (lora_shrink, lora_expand) equal a
naive per-token loop written from their docstrings, on mixed batches: tokens of different
adapter slots and of none (-1), slots no token uses, one slice and three of different sizes."""

from __future__ import annotations

import pytest
import torch

from platforms.kernels import lora_expand, lora_shrink

SLICES = {"one": (48,), "qkv": (64, 16, 16)}


def _naive_shrink(x, lora_a, slot_ids):
    num_slices, _, rank, _ = lora_a.shape
    out = torch.zeros(num_slices, x.shape[0], rank)
    for t, slot in enumerate(slot_ids.tolist()):
        if slot >= 0:
            for s in range(num_slices):
                out[s, t] = lora_a[s, slot].float() @ x[t].float()
    return out


def _naive_expand(y, buf, lora_b, slot_ids, slice_sizes):
    for t, slot in enumerate(slot_ids.tolist()):
        if slot < 0:
            continue
        offset = 0
        for s, size in enumerate(slice_sizes):
            delta = lora_b[s, slot, :size].float() @ buf[s, t]
            y[t, offset:offset + size] += delta.to(y.dtype)
            offset += size


def _batch(tokens, slice_sizes, rank, dtype, seed, hidden=96, num_slots=4):
    """Slot 3 is never used; about a quarter of the tokens have no adapter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    lora_a = (torch.randn(len(slice_sizes), num_slots, rank, hidden, generator=gen)
              * hidden**-0.5).to(dtype)
    lora_b = (torch.randn(len(slice_sizes), num_slots, max(slice_sizes) + 8, rank,
                          generator=gen) * rank**-0.5).to(dtype)
    slot_ids = torch.randint(-1, num_slots - 1, (tokens,), generator=gen, dtype=torch.int32)
    y = torch.randn(tokens, sum(slice_sizes), generator=gen).to(dtype)
    return x, lora_a, lora_b, slot_ids, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("slices", list(SLICES))
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_references_equal_a_per_token_loop(tokens, slices, rank, dtype):
    slice_sizes = SLICES[slices]
    x, lora_a, lora_b, slot_ids, y = _batch(tokens, slice_sizes, rank, dtype, seed=tokens)
    buf = lora_shrink(x, lora_a, slot_ids)
    assert buf.shape == (len(slice_sizes), tokens, rank) and buf.dtype == torch.float32
    torch.testing.assert_close(buf, _naive_shrink(x, lora_a, slot_ids), rtol=1e-5, atol=1e-5)

    got, want = y.clone(), y.clone()
    assert lora_expand(got, buf, lora_b, slot_ids, slice_sizes) is None
    _naive_expand(want, buf, lora_b, slot_ids, slice_sizes)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    base = slot_ids < 0
    assert torch.equal(got[base], y[base])  # tokens of the base model are untouched


def test_base_model_tokens_give_zero_rows_and_no_change():
    x, lora_a, lora_b, _, y = _batch(5, SLICES["qkv"], 8, torch.float32, seed=3)
    slot_ids = torch.full((5,), -1, dtype=torch.int32)
    buf = lora_shrink(x, lora_a, slot_ids)
    assert torch.equal(buf, torch.zeros_like(buf))
    got = y.clone()
    lora_expand(got, buf, lora_b, slot_ids, SLICES["qkv"])
    assert torch.equal(got, y)


def test_expand_writes_a_column_view_in_place():
    """y may be a view of a wider output (the model's merged projection)."""
    x, lora_a, lora_b, slot_ids, y = _batch(7, SLICES["qkv"], 16, torch.float32, seed=4)
    wide = torch.randn(7, 3 + y.shape[1] + 5)
    view = wide[:, 3:3 + y.shape[1]]
    before = wide.clone()
    buf = lora_shrink(x, lora_a, slot_ids)
    lora_expand(view, buf, lora_b, slot_ids, SLICES["qkv"])
    want = before[:, 3:3 + y.shape[1]].clone()
    _naive_expand(want, buf, lora_b, slot_ids, SLICES["qkv"])
    torch.testing.assert_close(wide[:, 3:3 + y.shape[1]], want)
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, -5:], before[:, -5:])


def test_empty_batch():
    x, lora_a, lora_b, _, y = _batch(0, SLICES["one"], 8, torch.float32, seed=5)
    slot_ids = torch.zeros(0, dtype=torch.int32)
    buf = lora_shrink(x, lora_a, slot_ids)
    assert buf.shape == (1, 0, 8)
    lora_expand(y, buf, lora_b, slot_ids, SLICES["one"])
