"""Triton RMSNorm, rotary embedding, SiLU-and-mul, GELU(tanh)-and-mul and the token bitmask against the torch references the core
uses (`platforms.kernels`), on fresh random inputs (CPU: Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine_cuda.ops import activation, bitmask, norm, rotary  # noqa: E402

from engine.models.layers.rotary import RotaryEmbedding  # noqa: E402
from platforms import kernels as reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding step of the dtype, relative (float32: summation order only).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _randn(*shape, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def _assert_close(got, expected, dtype):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=RTOL[dtype],
                               atol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(dtype):
    x = _randn(5, 3, 320, dtype=dtype, scale=3.0)  # hidden not a power of two
    weight = _randn(320, dtype=dtype, seed=1)
    _assert_close(norm.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), dtype)


def test_rms_norm_float32_weight_promotes_like_the_reference():
    x = _randn(4, 64, dtype=torch.bfloat16)
    weight = _randn(64, dtype=torch.float32, seed=1)
    _assert_close(norm.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5),
                  torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm(dtype):
    x = _randn(7, 256, dtype=dtype, seed=2)
    residual = _randn(7, 256, dtype=dtype, seed=3, scale=4.0)
    weight = _randn(256, dtype=dtype, seed=4)
    normed, summed = norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)  # one rounding of the same sum
    _assert_close(normed, ref_normed, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_embedding_in_place_on_strided_views(dtype):
    rope = RotaryEmbedding(64, max_position=512, theta=10000.0)
    cache = rope.cos_sin_cache.to(DEVICE)
    # q and k as views of a fused qkv output, as the attention layer has them.
    qkv = _randn(9, (4 + 2 + 2) * 64, dtype=dtype, seed=5)
    q, k = qkv[:, :256].view(9, 4, 64), qkv[:, 256:384].view(9, 2, 64)
    positions = torch.tensor([0, 1, 2, 500, 7, 3, 3, 99, 511], device=DEVICE)
    ref_q, ref_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cache)
    v_before = qkv[:, 384:].clone()
    got_q, got_k = rotary.rotary_embedding(positions, q, k, cache)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    _assert_close(q, ref_q, dtype)
    _assert_close(k, ref_k, dtype)
    assert torch.equal(qkv[:, 384:], v_before)  # the value columns are not touched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(dtype):
    x = _randn(3, 2, 2 * 1500, dtype=dtype, seed=6, scale=4.0)  # d spans two blocks
    _assert_close(activation.silu_and_mul(x), reference.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_tanh_and_mul(dtype):
    x = _randn(3, 2, 2 * 1500, dtype=dtype, seed=7, scale=4.0)  # d spans two blocks
    x[0, 0, :8] = torch.tensor([-30.0, -12.0, -1e-3, 0.0, 1e-3, 12.0, 30.0, -5.0])  # the tails
    _assert_close(activation.gelu_tanh_and_mul(x), reference.gelu_tanh_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab,masked,words", [
    (1, 40, [0], 2), (6, 5000, [4, 1, 2], 157), (5, 9000, [0, 1, 2, 3, 4], 282),
    (3, 5000, [2, 0], 100),  # tokens past the mask's last word are forbidden
])
def test_apply_token_bitmask(dtype, rows, vocab, masked, words):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = _randn(rows, vocab, dtype=dtype, seed=vocab)
    mask = torch.randint(-2**31, 2**31 - 1, (len(masked), words), generator=gen,
                         dtype=torch.int64).to(torch.int32).to(DEVICE)
    which = torch.tensor(masked, dtype=torch.int64, device=DEVICE)
    got, want = logits.clone(), logits.clone()
    bitmask.apply_token_bitmask(got, mask, which)
    reference.apply_token_bitmask(want, mask, which)
    assert torch.equal(got, want)
    assert got.isinf().any() and not got.isinf().all()


def test_clear_errors():
    with pytest.raises(ValueError, match="not even"):
        activation.silu_and_mul(torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="gelu_tanh_and_mul.*not even"):
        activation.gelu_tanh_and_mul(torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="float32"):
        q = torch.zeros(1, 1, 8, device=DEVICE)
        rotary.rotary_embedding(torch.zeros(1, dtype=torch.long, device=DEVICE), q, q,
                                torch.zeros(4, 8, dtype=torch.float16, device=DEVICE))
