"""Triton fused MoE (router top-k, alignment by expert, grouped GEMMs) against the torch
references of the contract (`platforms.kernels`) and a float64 loop, on fresh random inputs
(CPU: Triton's interpreter); compiled for sm_90 without spills; on a GPU, the Qwen3-30B-A3B
shape, no host synchronisation, and CUDA-graph replay with new routing.

Rule: the router's logits are shuffled ladders (distinct in every dtype), so a different
choice of experts is a bug, never a tie; choices are compared row by row sorted by id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from engine_cuda.ops import moe  # noqa: E402
from engine_cuda.platform import CudaPlatform  # noqa: E402

from platforms import kernels as reference  # noqa: E402
from platforms.kernels import MoERouting  # noqa: E402

HAS_CUDA = CudaPlatform.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (torch.cuda)")
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# Max error relative to the output's largest value, against float64.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
E, K, H, I = 8, 2, 64, 32  # noqa: E741

ROUTINGS = {
    "softmax-renorm": (8, MoERouting(top_k=2, renormalize=True), False),
    "softmax": (16, MoERouting(top_k=4), False),
    "sigmoid-bias": (16, MoERouting(top_k=3, scoring="sigmoid", renormalize=True), True),
    "grouped": (32, MoERouting(top_k=4, renormalize=True, num_expert_group=4, topk_group=2),
                False),
    "grouped-softmax-bias": (8, MoERouting(top_k=2, num_expert_group=4, topk_group=2), True),
    "grouped-sigmoid-bias-scaled": (64, MoERouting(
        top_k=6, scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=4,
        routed_scaling_factor=2.5), True),  # DeepSeek-V3-shaped
    "non-power-of-two": (12, MoERouting(top_k=3, renormalize=True, num_expert_group=3,
                                        topk_group=2), True),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def _ladder_logits(tokens: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    rows = [torch.randperm(experts, generator=gen) for _ in range(tokens)]
    return torch.stack(rows).float() * (4.0 / experts) - 2.0


def _experts(experts, hidden, inter, dtype, gen):
    return (_randn(experts, 2 * inter, hidden, dtype=dtype, gen=gen, scale=hidden**-0.5),
            _randn(experts, hidden, inter, dtype=dtype, gen=gen, scale=inter**-0.5))


def _truth(hidden, w13, w2, weights, ids, activation="silu"):
    """float64, one token and slot at a time, straight from the contract."""
    act = F.silu if activation == "silu" else (lambda x: F.gelu(x, approximate="tanh"))
    h64, w13, w2 = hidden.cpu().double(), w13.cpu().double(), w2.cpu().double()
    inter = w2.shape[2]
    out = torch.zeros_like(h64)
    for t in range(h64.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < w13.shape[0]:
                gate_up = w13[e] @ h64[t]
                out[t] += float(weights[t, j]) * (w2[e] @ (act(gate_up[:inter]) * gate_up[inter:]))
    return out


def _assert_near(got, want64, dtype):
    err = float((got.cpu().double() - want64).abs().max()) / max(1.0, float(want64.abs().max()))
    assert err <= TOLERANCE[dtype], f"error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def _by_id(weights, ids):
    order = ids.cpu().long().argsort(dim=-1)
    return ids.cpu().gather(1, order), weights.cpu().gather(1, order)


def _ids_with_holes(tokens, experts, top_k, gen):
    """Distinct ids per token among experts 0..E-3 (E-2 and E-1 get no token), with -1 (an
    expert of another EP rank) and E (past the local experts) sprinkled in."""
    ids = torch.stack([torch.randperm(experts - 2, generator=gen)[:top_k]
                       for _ in range(tokens)]).to(torch.int32)
    holes = torch.rand(tokens, top_k, generator=gen)
    ids[holes < 0.2] = -1
    ids[(holes >= 0.2) & (holes < 0.25)] = experts
    return ids.to(DEVICE)


# ---- router ----
@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_experts_equals_the_reference(name, tokens, dtype):
    experts, routing, with_bias = ROUTINGS[name]
    gen = _gen(tokens * 100 + experts)
    logits = _ladder_logits(tokens, experts, gen).to(DEVICE, dtype)
    bias = (torch.randn(experts, generator=gen) * 0.1).to(DEVICE) if with_bias else None
    weights, ids = moe.moe_select_experts(logits, routing, bias)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (tokens, routing.top_k)
    want_w, want_ids = reference.moe_select_experts(logits.cpu(), routing,
                                                    None if bias is None else bias.cpu())
    got_ids, got_w = _by_id(weights, ids)
    want_ids, want_w = _by_id(want_w, want_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-6)


def test_select_experts_on_gaussian_logits_and_a_strided_view():
    gen = _gen(3)
    logits = _randn(9, 2 * 128, dtype=torch.float32, gen=gen, scale=3.0)[:, ::2]
    routing = MoERouting(top_k=8, renormalize=True)  # Qwen3-MoE
    got_ids, got_w = _by_id(*moe.moe_select_experts(logits, routing))
    want_ids, want_w = _by_id(*reference.moe_select_experts(logits.cpu(), routing))
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-6)


# ---- alignment by expert ----
@pytest.mark.parametrize("tokens,block_m", [(1, 16), (5, 16), (33, 16), (33, 32), (70, 64)])
def test_align_by_expert_sorts_and_pads_every_run(tokens, block_m):
    ids = _ids_with_holes(tokens, E, K, _gen(tokens + block_m))
    sorted_slots, expert_ids, num_padded = (x.cpu() for x in moe.align_by_expert(ids, E, block_m))
    flat, num_slots = ids.cpu().reshape(-1).long(), ids.numel()
    valid = (flat >= 0) & (flat < E)
    counts = torch.bincount(flat[valid], minlength=E)
    # Shapes follow (T, k, E, BLOCK_M) only: CUDA-graph capturable.
    assert sorted_slots.shape == (moe.padded_bound(num_slots, E, block_m),)
    assert expert_ids.shape == (sorted_slots.numel() // block_m,)
    assert int(num_padded) == int(((counts + block_m - 1) // block_m * block_m).sum())
    used = int(num_padded) // block_m
    assert (expert_ids[used:] == -1).all()
    real = sorted_slots[sorted_slots < num_slots]
    assert sorted(real.tolist()) == torch.nonzero(valid).flatten().tolist()  # each valid once
    assert (sorted_slots[used * block_m:] == num_slots).all()
    for b in range(used):
        rows = sorted_slots[b * block_m:(b + 1) * block_m]
        rows = rows[rows < num_slots].long()
        assert len(rows) and (flat[rows] == expert_ids[b]).all()  # a used block is never empty
    assert expert_ids[:used].tolist() == sorted(expert_ids[:used].tolist())


def test_align_by_expert_with_no_local_token():
    ids = torch.full((3, K), -1, dtype=torch.int32, device=DEVICE)
    sorted_slots, expert_ids, num_padded = moe.align_by_expert(ids, E, 16)
    assert int(num_padded) == 0 and (expert_ids == -1).all() and (sorted_slots == 6).all()


# ---- grouped GEMMs ----
@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_experts_with_idle_experts_and_foreign_ids(tokens, dtype):
    gen = _gen(tokens)
    hidden = _randn(tokens, H, dtype=dtype, gen=gen)
    w13, w2 = _experts(E, H, I, dtype, gen)
    ids = _ids_with_holes(tokens, E, K, gen)
    weights = torch.rand(tokens, K, generator=gen).to(DEVICE)
    got = moe.fused_experts(hidden, w13, w2, weights, ids)
    assert got.dtype == dtype and got.shape == hidden.shape
    _assert_near(got, _truth(hidden, w13, w2, weights, ids), dtype)
    want = reference.fused_experts(hidden.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=TOLERANCE[dtype] * 2,
                               atol=TOLERANCE[dtype] * 2)


@pytest.mark.parametrize("tile", ["decode", "mid", "prefill"])
def test_fused_experts_every_default_tile_on_ragged_sizes(tile):
    # H and I not multiples of the K and N steps: every mask of both GEMMs is exercised.
    tokens, hidden_size, inter, top_k = 40, 80, 48, 4
    cfg = moe.default_config({"decode": 1, "mid": 160, "prefill": 4096}[tile], E, top_k,
                             torch.bfloat16)
    gen = _gen(7)
    hidden = _randn(tokens, hidden_size, dtype=torch.bfloat16, gen=gen)
    w13, w2 = _experts(E, hidden_size, inter, torch.bfloat16, gen)
    ids = _ids_with_holes(tokens, E, top_k, gen)
    weights = torch.rand(tokens, top_k, generator=gen).to(DEVICE)
    got = moe.fused_experts(hidden, w13, w2, weights, ids, config=cfg)
    _assert_near(got, _truth(hidden, w13, w2, weights, ids), torch.bfloat16)


def test_fused_experts_gelu_tanh():
    gen = _gen(11)
    hidden = _randn(5, H, dtype=torch.float32, gen=gen, scale=3.0)
    w13, w2 = _experts(E, H, I, torch.float32, gen)
    ids = _ids_with_holes(5, E, K, gen)
    weights = torch.rand(5, K, generator=gen).to(DEVICE)
    got = moe.fused_experts(hidden, w13, w2, weights, ids, "gelu_pytorch_tanh")
    _assert_near(got, _truth(hidden, w13, w2, weights, ids, "gelu_pytorch_tanh"), torch.float32)


@pytest.mark.parametrize("name", ["softmax-renorm", "grouped-softmax-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_moe_equals_the_reference(name, dtype):
    experts, routing, with_bias = ROUTINGS[name]
    gen = _gen(5)
    hidden = _randn(33, H, dtype=dtype, gen=gen)
    logits = _ladder_logits(33, experts, gen).to(DEVICE, dtype)
    bias = (torch.randn(experts, generator=gen) * 0.1).to(DEVICE) if with_bias else None
    w13, w2 = _experts(experts, H, I, dtype, gen)
    got = moe.fused_moe(hidden, logits, w13, w2, routing, bias)
    weights, ids = reference.moe_select_experts(logits.cpu(), routing,
                                                None if bias is None else bias.cpu())
    _assert_near(got, _truth(hidden, w13, w2, weights, ids), dtype)


def test_zero_tokens():
    w13, w2 = _experts(E, H, I, torch.float32, _gen(0))
    out = moe.fused_moe(torch.zeros(0, H, device=DEVICE), torch.zeros(0, E, device=DEVICE),
                        w13, w2, MoERouting(top_k=K))
    assert out.shape == (0, H)


def test_the_conformance_kit_passes_in_the_interpreter():
    """The contract's own cases (platforms.testing) through a CPU platform offering these."""
    from platforms.cpu.platform import CpuPlatform
    from platforms.kernels import KernelImpl
    from platforms.testing import check_kernel_overrides

    class TritonMoEOnCpu(CpuPlatform):
        name = "triton-moe-test"

        def kernel_overrides(self):
            return [KernelImpl(n, getattr(moe, n), priority=5, provider="test")
                    for n in ("moe_select_experts", "fused_experts", "fused_moe")]

    if HAS_CUDA:
        pytest.skip("the GPU runs the kit through CudaPlatform (test_platform.py)")
    worst = check_kernel_overrides(TritonMoEOnCpu(), dtypes=(torch.float32, torch.bfloat16))
    assert set(worst) == {"moe_select_experts", "fused_experts", "fused_moe"}


def test_clear_errors():
    w13, w2 = _experts(E, H, I, torch.float32, _gen(0))
    hidden, ids = torch.zeros(2, H, device=DEVICE), torch.zeros(2, K, dtype=torch.int32,
                                                                 device=DEVICE)
    weights = torch.ones(2, K, device=DEVICE)
    with pytest.raises(ValueError, match="activation 'relu'"):
        moe.fused_experts(hidden, w13, w2, weights, ids, "relu")
    with pytest.raises(ValueError, match=r"do not fit hidden size 64"):
        moe.fused_experts(hidden, w13, w2[:, :, :5], weights, ids)
    with pytest.raises(ValueError, match=r"\[2, k\]"):
        moe.fused_experts(hidden, w13, w2, weights[:, :1], ids)
    logits = torch.zeros(2, E, device=DEVICE)
    with pytest.raises(ValueError, match="top_k 9"):
        moe.moe_select_experts(logits, MoERouting(top_k=9))
    with pytest.raises(ValueError, match="num_expert_group=3"):
        moe.moe_select_experts(logits, MoERouting(top_k=2, num_expert_group=3, topk_group=1))
    with pytest.raises(ValueError, match=r"correction_bias \(4,\)"):
        moe.moe_select_experts(logits, MoERouting(top_k=2), torch.zeros(4, device=DEVICE))


# ---- tile configs as data ----
def test_tuned_configs_round_trip_through_json_and_pick_the_nearest_bucket(tmp_path):
    small, large = moe.default_config(1, 128, 8, torch.bfloat16), moe.default_config(
        4096, 128, 8, torch.bfloat16)
    key = moe.config_key(128, 768, 2048, torch.bfloat16)
    assert key == "E=128,I=768,H=2048,dtype=bfloat16"
    path = tmp_path / "moe_configs.json"
    path.write_text(json.dumps({"configs": {"NVIDIA H200": {key: {
        "1": small.to_json(), "512": large.to_json()}}}}))
    configs = moe.load_configs(str(path))
    assert moe.tuned_config(configs, "NVIDIA H200", key, 8) == small
    assert moe.tuned_config(configs, "NVIDIA H200", key, 300) == large
    assert moe.tuned_config(configs, "NVIDIA H100", key, 8) is None
    assert moe.tuned_config(configs, "NVIDIA H200", "E=64,I=768,H=2048,dtype=bfloat16", 8) is None


def test_the_shipped_config_file_parses():
    with open(moe.CONFIG_PATH, encoding="utf-8") as f:
        data = json.load(f)
    for shapes in data["configs"].values():
        for buckets in shapes.values():
            for entry in buckets.values():
                moe.MoETileConfig.from_json(entry)


# ---- sm_90 compile (child process, like test_ops_compile.py) ----
def _moe_arg(name: str) -> str:
    if name in ("h_ptr", "w_ptr", "out_ptr", "x_ptr"):
        return "*bf16"
    if name == "weights_ptr":
        return "*fp32"
    return "*i32" if name.endswith("_ptr") else "i32"


def _compile_moe(bin_dir: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = {"inter", "hidden"}

    def build(fn, arg_type, constexprs, num_warps=4, num_stages=3):
        signature = {n: "constexpr" if n in constexprs else arg_type(n) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if signature[n].startswith("*") or n.startswith("stride") or n in aligned}
        return triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})

    from test_ops_compile import _stack_bytes

    for tokens in (1, 64, 4096):
        cfg = moe.default_config(tokens, 128, 8, torch.bfloat16)
        for kernel, tile, extra in ((moe._gate_up_kernel, cfg.gate_up, {"GELU": False}),
                                    (moe._down_kernel, cfg.down, {})):
            compiled = build(kernel, _moe_arg, dict(
                BLOCK_M=cfg.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                GROUP_M=tile.group_m, IEEE=False, **extra), tile.num_warps, tile.num_stages)
            print(f"moe {kernel.__name__} {tokens} stack={_stack_bytes(compiled, bin_dir)}",
                  flush=True)
    build(moe._select_experts_kernel,
          lambda n: {"logits_ptr": "*bf16", "bias_ptr": "*fp32", "weights_ptr": "*fp32",
                     "ids_ptr": "*i32", "scale": "fp32"}.get(n, "i32"),
          dict(TOP_K=8, K_PAD=8, G_PAD=8, S_PAD=32, TOPK_GROUP=4, SIGMOID=True, HAS_BIAS=True,
               RENORMALIZE=True))
    build(moe._count_kernel, lambda n: "*i32" if n.endswith("_ptr") else "i32", dict(BLOCK=256))
    build(moe._blocks_kernel, lambda n: "*i32" if n.endswith("_ptr") else "i32",
          dict(BLOCK_M=16, E_PAD=128, BLOCK_B=32))
    build(moe._scatter_kernel, lambda n: "*i32" if n.endswith("_ptr") else "i32",
          dict(BLOCK=256))
    build(moe._sum_slots_kernel,
          lambda n: {"slot_out_ptr": "*bf16", "out_ptr": "*bf16", "ids_ptr": "*i32"}.get(n, "i32"),
          dict(TOP_K=8, BLOCK_H=1024))
    print("moe small kernels ok", flush=True)


@pytest.fixture(scope="module")
def compiled() -> str:
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(here), here,
                                                      env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), bin_dir], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("tokens", [1, 64, 4096])
@pytest.mark.parametrize("kernel", ["_gate_up_kernel", "_down_kernel"])
def test_moe_gemms_compile_for_sm90_without_spills(compiled, kernel, tokens):
    assert f"moe {kernel} {tokens} stack=0\n" in compiled, compiled


def test_moe_small_kernels_compile_for_sm90(compiled):
    assert "moe small kernels ok" in compiled


# ---- GPU: the Qwen3-30B-A3B shape (E=128, k=8, H=2048, I=768) ----
QWEN3_MOE = dict(experts=128, top_k=8, hidden=2048, inter=768)


def _qwen3_inputs(tokens: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    e, h, i = QWEN3_MOE["experts"], QWEN3_MOE["hidden"], QWEN3_MOE["inter"]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    return (rand(tokens, h), rand(tokens, e), rand(e, 2 * i, h, scale=h**-0.5),
            rand(e, h, i, scale=i**-0.5))


@needs_gpu
@pytest.mark.parametrize("tokens", [1, 8, 64, 256, 4096])
def test_gpu_qwen3_moe_shape_equals_the_reference(tokens):
    hidden, logits, w13, w2 = _qwen3_inputs(tokens)
    routing = MoERouting(top_k=QWEN3_MOE["top_k"], renormalize=True)
    got = moe.fused_moe(hidden, logits, w13, w2, routing)
    weights, ids = reference.moe_select_experts(logits, routing)
    got_ids, got_w = _by_id(*moe.moe_select_experts(logits, routing))
    want_ids, want_w = _by_id(weights, ids)
    assert torch.equal(got_ids, want_ids)
    want32 = reference.fused_experts(hidden.float(), w13.float(), w2.float(), weights, ids)
    err = float((got.float() - want32).abs().max()) / max(1.0, float(want32.abs().max()))
    assert err <= TOLERANCE[torch.bfloat16], err


@needs_gpu
def test_gpu_fused_moe_makes_no_host_sync():
    hidden, logits, w13, w2 = _qwen3_inputs(64)
    routing = MoERouting(top_k=QWEN3_MOE["top_k"], renormalize=True)
    moe.fused_moe(hidden, logits, w13, w2, routing)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe.fused_moe(hidden, logits, w13, w2, routing)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_gpu_cuda_graph_replays_with_new_routing(tokens):
    hidden, logits, w13, w2 = _qwen3_inputs(tokens)
    routing = MoERouting(top_k=QWEN3_MOE["top_k"], renormalize=True)
    static_h, static_logits = hidden.clone(), logits.clone()
    moe.fused_moe(static_h, static_logits, w13, w2, routing)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe.fused_moe(static_h, static_logits, w13, w2, routing)
    for seed in (1, 2):
        new_h, new_logits, _, _ = _qwen3_inputs(tokens, seed)
        if seed == 2:  # every token to the same 8 experts: the other 120 idle
            new_logits = torch.full_like(new_logits, -5.0)
            new_logits[:, 40:48] = torch.arange(8, device="cuda", dtype=new_logits.dtype)
        static_h.copy_(new_h)
        static_logits.copy_(new_logits)
        graph.replay()
        torch.cuda.synchronize()
        eager = moe.fused_moe(new_h, new_logits, w13, w2, routing)
        assert torch.equal(static_out, eager)  # deterministic: same bits, graph or not


if __name__ == "__main__":
    _compile_moe(sys.argv[1])
