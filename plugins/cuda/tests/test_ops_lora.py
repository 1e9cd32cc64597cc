"""Triton batched multi-LoRA (lora_shrink, lora_expand) against the torch references of the
contract (`platforms.kernels`) on mixed batches (CPU: Triton's interpreter); compiled for
sm_90 without spills; on a GPU, the Llama-8B shapes, no host synchronisation, and CUDA-graph
replay with new slot ids.

Rule: every batch mixes tokens of several adapter slots with tokens of none (-1), and leaves
a slot unused; the reference runs on the same inputs (on the CPU), so the only difference
allowed is the order of float32 sums.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from engine_cuda.ops import lora  # noqa: E402
from engine_cuda.platform import CudaPlatform  # noqa: E402

from platforms import kernels as reference  # noqa: E402

HAS_CUDA = CudaPlatform.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (torch.cuda)")
DEVICE = "cuda" if HAS_CUDA else "cpu"
SLICES = {"one": (48,), "qkv": (64, 16, 16), "gate-up": (40, 40)}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(tokens, slice_sizes, rank, dtype, seed, hidden=96, num_slots=4, device=DEVICE):
    """x, lora_a, lora_b, slot_ids, y; slots -1..num_slots-2 (the last slot unused)."""
    gen = torch.Generator().manual_seed(seed)
    num_slices = len(slice_sizes)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    x = rand(tokens, hidden)
    lora_a = rand(num_slices, num_slots, rank, hidden, scale=hidden**-0.5)
    lora_b = rand(num_slices, num_slots, max(slice_sizes) + 8, rank, scale=rank**-0.5)
    slot_ids = torch.randint(-1, num_slots - 1, (tokens,), generator=gen, dtype=torch.int32)
    y = rand(tokens, sum(slice_sizes))
    return x, lora_a, lora_b, slot_ids.to(device), y


def _check_both(x, lora_a, lora_b, slot_ids, y, slice_sizes, tol):
    buf = lora.lora_shrink(x, lora_a, slot_ids)
    want_buf = reference.lora_shrink(x.cpu(), lora_a.cpu(), slot_ids.cpu())
    assert buf.dtype == torch.float32 and buf.shape == want_buf.shape
    torch.testing.assert_close(buf.cpu(), want_buf, rtol=1e-5, atol=1e-5)
    got, want = y.clone(), y.cpu().clone()
    lora.lora_expand(got, want_buf.to(y.device), lora_b, slot_ids, slice_sizes)
    reference.lora_expand(want, want_buf, lora_b.cpu(), slot_ids.cpu(), slice_sizes)
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
    base = (slot_ids < 0).cpu()
    assert torch.equal(got.cpu()[base], y.cpu()[base])  # base-model tokens untouched
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("slices", list(SLICES))
@pytest.mark.parametrize("tokens", [1, 7, 64, 200])  # 200: the 64-token blocks
def test_equals_the_reference(tokens, slices, rank, dtype):
    args = _inputs(tokens, SLICES[slices], rank, dtype, seed=tokens + rank)
    _check_both(*args, SLICES[slices], TOLERANCE[dtype])


def test_every_token_of_a_block_a_different_slot():
    """A decode block of 16 requests with 16 adapters: 16 dots in one program."""
    x, lora_a, lora_b, _, y = _inputs(16, SLICES["qkv"], 16, torch.float32, 1, num_slots=16)
    slot_ids = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    _check_both(x, lora_a, lora_b, slot_ids.to(DEVICE, torch.int32), y, SLICES["qkv"], 1e-5)


def test_rank_below_the_tile_and_no_adapter_in_the_batch():
    x, lora_a, lora_b, _, y = _inputs(9, SLICES["one"], 4, torch.float32, 3)
    slot_ids = torch.full((9,), -1, dtype=torch.int32, device=DEVICE)
    got = _check_both(x, lora_a, lora_b, slot_ids, y, SLICES["one"], 1e-5)
    assert torch.equal(got, y)
    slot_ids[4] = 1  # one token with an adapter, rank 4 (< the 16-wide tile)
    _check_both(x, lora_a, lora_b, slot_ids, y, SLICES["one"], 1e-5)


def test_expand_into_a_column_view_and_more_slices_than_one_launch_takes():
    sizes = (24, 16, 16, 8, 32)  # five slices: two launches of the expand kernel
    x, lora_a, lora_b, slot_ids, _ = _inputs(20, sizes, 8, torch.float32, 4)
    wide = torch.randn(20, 5 + sum(sizes) + 3, device=DEVICE)
    before = wide.clone()
    view = wide[:, 5:5 + sum(sizes)]
    _check_both(x, lora_a, lora_b, slot_ids, view, sizes, 1e-5)  # on a copy of the view
    buf = lora.lora_shrink(x, lora_a, slot_ids)
    lora.lora_expand(view, buf, lora_b, slot_ids, sizes)
    want = before[:, 5:5 + sum(sizes)].cpu().clone()
    reference.lora_expand(want, buf.cpu(), lora_b.cpu(), slot_ids.cpu(), sizes)
    torch.testing.assert_close(wide[:, 5:5 + sum(sizes)].cpu(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(wide[:, :5], before[:, :5]) and torch.equal(wide[:, -3:], before[:, -3:])


def test_empty_batch():
    x, lora_a, lora_b, slot_ids, y = _inputs(0, SLICES["qkv"], 8, torch.float32, 5)
    buf = lora.lora_shrink(x, lora_a, slot_ids)
    assert buf.shape == (3, 0, 8)
    lora.lora_expand(y, buf, lora_b, slot_ids, SLICES["qkv"])


def test_conformance_kit_accepts_the_triton_lora_ops():
    from platforms.cpu.platform import CpuPlatform
    from platforms.kernels import KernelImpl
    from platforms.testing import check_kernel_overrides

    class TritonLoRAOnCpu(CpuPlatform):
        name = "triton-lora-test"

        def kernel_overrides(self):
            return [KernelImpl(n, getattr(lora, n), priority=5, provider="test")
                    for n in ("lora_shrink", "lora_expand")]

    if HAS_CUDA:
        pytest.skip("the GPU runs the kit through CudaPlatform (test_platform.py)")
    worst = check_kernel_overrides(TritonLoRAOnCpu(), dtypes=(torch.float32, torch.bfloat16))
    assert set(worst) == {"lora_shrink", "lora_expand"}


# (kernel, BLOCK_T, BLOCK_N or BLOCK_H, num_warps): the tiles `lora.py` launches with bf16.
COMPILE_CASES = [("shrink", 16, 128, 4), ("shrink", 64, 128, 4), ("expand", 16, 64, 4),
                 ("expand", 64, 128, 8)]


def _compile_lora(bin_dir: str) -> None:
    """Child process (no interpreter): lower each bf16 tile for sm_90, print its stack."""
    from test_ops_compile import _compile, _stack_bytes

    def arg(name: str) -> str:
        if name == "slot_ptr":
            return "*i32"
        if name in ("out_ptr", "buf_ptr"):
            return "*fp32"
        return "*bf16" if name.endswith("_ptr") else "i32"

    for name, block_t, block, warps in COMPILE_CASES:
        if name == "shrink":
            kernel = _compile(lora._shrink_kernel, arg, dict(BLOCK_T=block_t, BLOCK_R=16,
                                                             BLOCK_H=block, IEEE=False), warps)
        else:
            kernel = _compile(lora._expand_kernel, arg,
                              dict(BLOCK_T=block_t, BLOCK_R=16, BLOCK_N=block), warps)
        print(f"{name} {block_t} {block} {warps} stack={_stack_bytes(kernel, bin_dir)}",
              flush=True)


def test_kernels_compile_for_sm90_without_spills():
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.path.dirname(here),
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), bin_dir], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, block_t, block, warps in COMPILE_CASES:
        assert f"{name} {block_t} {block} {warps} stack=0\n" in done.stdout, done.stdout


# ---- on a GPU: Llama-3-8B's q/k/v projection (H 4096, q 4096 / k, v 1024), rank 16, 8 slots

LLAMA_QKV = (4096, 1024, 1024)


def _llama_inputs(tokens, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    x = rand(tokens, 4096)
    lora_a = rand(3, 8, 16, 4096, scale=4096**-0.5)
    lora_b = rand(3, 8, 4096, 16, scale=16**-0.5)
    # Requests of 1..64 tokens in a row, each of one slot or of none (-1).
    lengths = torch.randint(1, 65, (tokens,), generator=gen, device="cuda")
    request = torch.repeat_interleave(torch.arange(tokens, device="cuda"), lengths)[:tokens]
    slots = torch.randint(-1, 8, (tokens,), generator=gen, device="cuda", dtype=torch.int32)
    return x, lora_a, lora_b, slots[request].contiguous(), rand(tokens, sum(LLAMA_QKV))


@needs_gpu
@pytest.mark.parametrize("tokens", [1, 256, 2048])
def test_gpu_llama_8b_shapes_equal_the_reference(tokens):
    x, lora_a, lora_b, slot_ids, y = _llama_inputs(tokens)
    buf = lora.lora_shrink(x, lora_a, slot_ids)
    want_buf = reference.lora_shrink(x, lora_a, slot_ids)
    torch.testing.assert_close(buf, want_buf, rtol=1e-4, atol=1e-4)
    got, want = y.clone(), y.clone()
    lora.lora_expand(got, want_buf, lora_b, slot_ids, LLAMA_QKV)
    reference.lora_expand(want, want_buf, lora_b, slot_ids, LLAMA_QKV)
    # One bf16 rounding of the delta apart at most, from float32 sums in another order.
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@needs_gpu
def test_gpu_lora_ops_make_no_host_sync():
    x, lora_a, lora_b, slot_ids, y = _llama_inputs(256)
    lora.lora_expand(y, lora.lora_shrink(x, lora_a, slot_ids), lora_b, slot_ids, LLAMA_QKV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lora.lora_expand(y, lora.lora_shrink(x, lora_a, slot_ids), lora_b, slot_ids,
                         LLAMA_QKV)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
@pytest.mark.parametrize("tokens", [1, 256])
def test_gpu_cuda_graph_replays_with_new_slot_ids(tokens):
    x, lora_a, lora_b, slot_ids, y = _llama_inputs(tokens)
    static_x, static_slots, static_y = x.clone(), slot_ids.clone(), y.clone()

    def step():
        buf = lora.lora_shrink(static_x, lora_a, static_slots)
        lora.lora_expand(static_y, buf, lora_b, static_slots, LLAMA_QKV)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2, 3):
        new_x, _, _, new_slots, new_y = _llama_inputs(tokens, seed)
        if seed == 2:
            new_slots.fill_(-1)  # a step of base-model tokens only: y unchanged
        if seed == 3:
            new_slots.fill_(7)  # every token on one adapter
        static_x.copy_(new_x)
        static_slots.copy_(new_slots)
        static_y.copy_(new_y)
        graph.replay()
        torch.cuda.synchronize()
        eager = new_y.clone()
        lora.lora_expand(eager, lora.lora_shrink(new_x, lora_a, new_slots), lora_b, new_slots,
                         LLAMA_QKV)
        assert torch.equal(static_y, eager)  # same bits, graph or not
        if seed == 2:
            assert torch.equal(static_y, new_y)


if __name__ == "__main__":
    _compile_lora(sys.argv[1])
