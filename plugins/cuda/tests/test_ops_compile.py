"""Every Triton kernel compiles for the H100 (sm_90) on a machine without a GPU.

Rule: the interpreter runs kernels as Python and accepts code the compiler rejects (a
non-constexpr global, a bad loop-carried type); this test lowers each kernel through ptxas
with the specialisations the JIT infers at run time (16-byte aligned pointers, strides that
are multiples of 16) and checks the attention tiles do not spill registers. The compiling
runs in a child process (this file as a script), where TRITON_INTERPRET is unset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

# Integer arguments the JIT sees as multiples of 16 for the Llama-8B shape (it specialises
# on that), besides every stride.
_ALIGNED_INTS = {"block_size", "hidden", "d", "num_kv_heads", "head_size"}
# (head_size, prefill tile?, num_splits, window and soft-cap?) of the attention kernels checked.
ATTENTION_CASES = [(128, False, 1, False), (128, False, 8, False), (128, True, 1, False),
                   (64, True, 1, False), (256, True, 1, False), (128, False, 8, True),
                   (128, True, 1, True), (256, True, 1, True)]


def _compile(fn, arg_type, constexprs, num_warps=4, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else arg_type(name)
                 for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name.startswith("stride")
             or name in _ALIGNED_INTS}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _stack_bytes(kernel, bin_dir: str) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    return int(usage.split("STACK:")[1].split()[0])


def _attention_arg(name: str) -> str:
    if name in ("q_ptr", "cache_ptr", "out_ptr"):
        return "*bf16"
    if name.startswith("part_"):
        return "*fp32"
    if name in ("qsl_ptr", "seq_lens_ptr", "bt_ptr"):
        return "*i32"
    return "fp32" if name in ("qk_scale", "cap_in") else "i32"


def _compile_all(bin_dir: str) -> None:
    """Child process: compile every kernel, print one line per attention case."""
    from engine_cuda.ops import activation, kv_cache, norm, rotary
    from engine_cuda.ops import attention as attn

    for head_size, prefill, num_splits, features in ATTENTION_CASES:
        cfg = (attn.prefill_config if prefill else attn.small_query_config)(4, head_size)
        constexprs = dict(GROUP=4, GROUP_PAD=4, HEAD_SIZE=head_size, BLOCK_Q=cfg.block_q,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          ONE_TILE_PER_REQ=not prefill, SPLIT=num_splits > 1, IEEE=False,
                          WINDOW=features, SOFT_CAP=features)
        small = attn.small_query_config(4, head_size)
        constexprs.update(SMALL_Q=small.block_q if prefill else 0, SMALL_M=small.block_m,
                          SMALL_N=small.block_n)
        kernel = _compile(attn._paged_attention_kernel, _attention_arg, constexprs,
                          cfg.num_warps, cfg.num_stages)
        print(f"attention {head_size} {prefill} {num_splits} {features} "
              f"stack={_stack_bytes(kernel, bin_dir)}", flush=True)
    _compile(attn._merge_splits_kernel,
             lambda n: {"out_ptr": "*bf16", "qsl_ptr": "*i32"}.get(
                 n, "*fp32" if n.startswith("part") else "i32"),
             dict(SPLITS_PAD=1 << (attn.MAX_SPLITS - 1).bit_length(), HEAD_SIZE=128))
    _compile(kv_cache._write_kv_kernel,
             lambda n: "*i64" if n == "slot_ptr" else "*bf16" if n.endswith("_ptr") else "i32",
             dict(BLOCK_H=8, BLOCK_D=128))
    _compile(norm._rms_norm_kernel,
             lambda n: "*bf16" if n.endswith("_ptr") else "fp32" if n == "eps" else "i32",
             dict(HAS_RESIDUAL=True, BLOCK=4096), num_warps=16)
    _compile(rotary._rotary_kernel,
             lambda n: {"pos_ptr": "*i64", "cache_ptr": "*fp32"}.get(
                 n, "*bf16" if n.endswith("_ptr") else "i32"),
             dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=8))
    _compile(activation._silu_and_mul_kernel,
             lambda n: "*bf16" if n.endswith("_ptr") else "i32", dict(BLOCK=1024))
    _compile(activation._gelu_tanh_and_mul_kernel,
             lambda n: "*bf16" if n.endswith("_ptr") else "i32", dict(BLOCK=1024))
    print("small kernels ok", flush=True)


@pytest.fixture(scope="module")
def compiled() -> str:
    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plugin_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [plugin_root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), bin_dir], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize(("head_size", "prefill", "num_splits", "features"), ATTENTION_CASES)
def test_attention_compiles_without_spills(compiled, head_size, prefill, num_splits, features):
    line = f"attention {head_size} {prefill} {num_splits} {features} stack="
    assert f"{line}0\n" in compiled, f"not compiled, or spills registers:\n{compiled}"


def test_small_kernels_compile(compiled):
    assert "small kernels ok" in compiled


if __name__ == "__main__":
    _compile_all(sys.argv[1])
