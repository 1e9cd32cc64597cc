"""The CPU platform's native named-op overrides equal the torch references on fresh random
inputs, including the strided q/k views the Llama decoder passes, and they are the ones the
engine resolves on CPU (the references where ENGINE_CPU_NATIVE=0)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from platforms import kernels as ref
from platforms.cpu.native import load_library, native_kernels_status
from platforms.cpu.ops import native_kernel_overrides
from platforms.cpu.platform import CpuPlatform
from platforms.kernels import resolve_kernels

TOKENS = [1, 3, 17, 300]  # 300 x 576 passes the threshold where the kernels go parallel
# The model ops the native library implements (the grammar bitmask and Gemma's gelu-tanh
# stay the reference).
NATIVE_OPS = set(ref.KERNEL_NAMES) - {"apply_token_bitmask", "gelu_tanh_and_mul",
                                     "moe_select_experts", "fused_experts", "fused_moe",
                                     "lora_shrink", "lora_expand"}
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def native() -> dict:
    assert load_library() is not None, native_kernels_status()
    ops = {impl.name: impl.fn for impl in native_kernel_overrides("cpu")}
    assert set(ops) == NATIVE_OPS
    return ops


def _qkv_views(t: int, heads: int, kv_heads: int, head: int, gen: torch.Generator):
    """q, k as LlamaAttention makes them: a split of the fused qkv output, then reshape."""
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head, generator=gen)
    q, k, _ = qkv.split([heads * head, kv_heads * head, kv_heads * head], dim=-1)
    return qkv, q.reshape(-1, heads, head), k.reshape(-1, kv_heads, head)


def test_cpu_platform_resolves_the_native_ops(native):
    table = resolve_kernels("cpu", CpuPlatform().kernel_overrides())
    assert dict(table.providers) == {name: "cpu-native" if name in NATIVE_OPS else "reference"
                                     for name in ref.KERNEL_NAMES}
    assert table["rms_norm"] is native["rms_norm"]


def test_disabled_by_env_leaves_the_references():
    code = ("from platforms.cpu.platform import CpuPlatform;"
            "from platforms.cpu.native import native_kernels_status as s;"
            "print(len(CpuPlatform().kernel_overrides()), s())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "ENGINE_CPU_NATIVE": "0"}, check=True)
    assert out.stdout.split(maxsplit=1) == ["0", "disabled by ENGINE_CPU_NATIVE=0\n"]


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("hidden", [64, 576, 2048])
@pytest.mark.parametrize("seed", [0, 1])
def test_rms_norm_and_fused_add(native, t, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hidden, generator=gen) * 3
    residual = torch.randn(t, hidden, generator=gen)
    weight = torch.randn(hidden, generator=gen)
    eps = [1e-6, 1e-5][seed]
    torch.testing.assert_close(native["rms_norm"](x, weight, eps), ref.rms_norm(x, weight, eps),
                               **TOL)
    x_before, residual_before = x.clone(), residual.clone()
    out, total = native["fused_add_rms_norm"](x, residual, weight, eps)
    want_out, want_total = ref.fused_add_rms_norm(x, residual, weight, eps)
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(total, want_total, rtol=0, atol=0)
    # Like the reference, the fused op leaves its inputs alone.
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.parametrize("t", TOKENS)
def test_rms_norm_per_head_on_strided_views(native, t):
    # Qwen3's q/k norm: RMSNorm over each head of the strided q view.
    gen = torch.Generator().manual_seed(t)
    _, q, k = _qkv_views(t, 8, 2, 128, gen)
    weight = torch.randn(128, generator=gen)
    for x in (q, k):
        assert t == 1 or not x.is_contiguous()  # one token: the view is dense
        got = native["rms_norm"](x, weight, 1e-6)
        assert got.shape == x.shape
        torch.testing.assert_close(got, ref.rms_norm(x, weight, 1e-6), **TOL)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("heads,kv_heads,head", [(9, 3, 64), (8, 8, 128), (4, 1, 32)])
def test_rotary_in_place_on_qkv_views(native, t, heads, kv_heads, head):
    gen = torch.Generator().manual_seed(t * 31 + head)
    max_pos = 4096
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32),
                        torch.rand(head // 2, generator=gen))
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (t,), generator=gen)
    qkv, q, k = _qkv_views(t, heads, kv_heads, head, gen)
    v_before = qkv[:, (heads + kv_heads) * head:].clone()
    want_q, want_k = ref.rotary_embedding(positions, q, k, cache)
    got_q, got_k = native["rotary_embedding"](positions, q, k, cache)
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(got_k, want_k, **TOL)
    # Rotated in place (the contract allows it), and v, the rest of the buffer, untouched.
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert torch.equal(qkv[:, (heads + kv_heads) * head:], v_before)


def test_rotary_position_outside_the_cache_is_an_error(native):
    cache = torch.randn(8, 16)
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    q_before = q.clone()
    with pytest.raises(IndexError, match="position 8 of token 1"):
        native["rotary_embedding"](torch.tensor([3, 8]), q, k, cache)
    assert torch.equal(q, q_before)  # checked before anything was written


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("d", [8, 1536, 5000])
def test_silu_and_mul(native, t, d):
    gen = torch.Generator().manual_seed(d + t)
    x = torch.randn(t, 2 * d, generator=gen) * 6
    x[0, 0] = -200.0  # far in the tail, where exp(-x) overflows float32
    torch.testing.assert_close(native["silu_and_mul"](x), ref.silu_and_mul(x), **TOL)
    # A strided row view (e.g. a slice of a wider buffer) is read at its own stride.
    wide = torch.randn(t, 2 * d + 8, generator=gen)[:, : 2 * d]
    torch.testing.assert_close(native["silu_and_mul"](wide), ref.silu_and_mul(wide), **TOL)


def test_other_dtypes_and_layouts_take_the_reference(native):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=gen)
    w = torch.randn(64, generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        xd, wd = x.to(dtype), w.to(dtype)
        got = native["rms_norm"](xd, wd, 1e-6)
        assert got.dtype == ref.rms_norm(xd, wd, 1e-6).dtype
        torch.testing.assert_close(got, ref.rms_norm(xd, wd, 1e-6))
        torch.testing.assert_close(native["silu_and_mul"](xd), ref.silu_and_mul(xd))
    # Last dimension not contiguous: the native path cannot read it, the reference can.
    xt = torch.randn(64, 6, generator=gen).t()
    torch.testing.assert_close(native["rms_norm"](xt, w, 1e-6), ref.rms_norm(xt, w, 1e-6))
