"""GPU benchmark of the Triton paged attention: decode KV bandwidth and prefill TFLOP/s,
each checked against torch SDPA on the same inputs.

Rule: every number is a median of `triton.testing.do_bench` on the GPU this runs on, printed
next to the ceiling measured in the same run (device copy bandwidth) and the device's name.
Run: `python -m engine_cuda.ops.bench_ops [--sweep]` (GPU only; Llama-3.1-8B attention shape:
32 query heads, 8 KV heads, head size 128, bf16, 16-token blocks).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from platforms.util import cdiv

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DEVICE = "cuda"
DECODE_CASES = [(b, c) for b in (1, 64, 256) for c in (1024, 4096)]  # (batch, context)
PREFILL_CASES = [(1, 4096), (8, 1024)]  # (prompts, prompt length)
# A serving step: one fresh prompt chunk mixed with many decodes (prompt, decodes, context).
MIXED_CASE = (2048, 255, 1024)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    import triton.testing

    src = torch.empty(1 << 29, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _paged_batch(q_lens: list[int], seq_lens: list[int], gen: torch.Generator) -> dict:
    """Random cache holding every request's keys (shuffled blocks) and its queries."""
    blocks = [cdiv(s, BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks)
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=DEVICE)
    pos = 0
    for i, b in enumerate(blocks):
        table[i, :b] = perm[pos:pos + b]
        pos += b
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=DTYPE,
                        device=DEVICE, generator=gen)
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_SIZE, dtype=DTYPE, device=DEVICE,
                    generator=gen)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device=DEVICE)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens, device=DEVICE), 0)
    return dict(q=q, cache=cache, table=table, qsl=qsl, q_lens=q_lens, seq_lens=seq_lens,
                seq_lens_gpu=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE))


def _run_triton(b: dict, **kwargs) -> tuple[torch.Tensor, callable]:
    from engine_cuda.ops.attention import paged_attention

    out = torch.empty_like(b["q"])

    def fn():
        paged_attention(b["q"], b["cache"], out, b["qsl"], b["seq_lens_gpu"], b["table"],
                        HEAD_SIZE**-0.5, max(b["q_lens"]), max(b["seq_lens"]), **kwargs)
    fn()
    return out, fn


def _sdpa_reference(b: dict) -> tuple[torch.Tensor, callable]:
    """Same attention with torch SDPA over gathered contiguous K/V, one call per request
    (the gather is outside the timed call)."""
    outs, calls = [], []
    qsl = b["qsl"].tolist()
    for i, (q_len, seq_len) in enumerate(zip(b["q_lens"], b["seq_lens"])):
        pos = torch.arange(seq_len, device=DEVICE)
        slots = b["table"][i, pos // BLOCK_SIZE].long(), pos % BLOCK_SIZE
        k = b["cache"][0][slots].transpose(0, 1)[None]  # [1, Hkv, S, D]
        v = b["cache"][1][slots].transpose(0, 1)[None]
        q = b["q"][qsl[i]:qsl[i + 1]].transpose(0, 1)[None]  # [1, H, Q, D]
        causal = q_len > 1
        if causal and q_len != seq_len:
            raise ValueError("the SDPA reference handles fresh prompts and decodes only")
        calls.append((q, k, v, causal))
    def fn():
        outs.clear()
        for q, k, v, causal in calls:
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                       enable_gqa=True))
    fn()
    out = torch.cat([o[0].transpose(0, 1) for o in outs])
    return out, fn


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def bench_decode(sweep: bool, copy_bw: float) -> None:
    import triton.testing

    from engine_cuda.ops.attention import TileConfig, choose_num_splits

    print(f"\n# decode (H={NUM_HEADS}, Hkv={NUM_KV_HEADS}, D={HEAD_SIZE}, bf16); "
          f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    for batch, context in DECODE_CASES:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        b = _paged_batch([1] * batch, [context] * batch, gen)
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_SIZE * DTYPE.itemsize
        ref, _ = _sdpa_reference(b)
        splits = choose_num_splits(batch, NUM_KV_HEADS, context)
        variants: list[tuple[str, dict]] = [(f"auto (splits={splits})", {})]
        if splits > 1:
            variants.append(("splits=1", {"num_splits": 1}))
        if sweep:
            variants += [(f"block_n={n}", {"decode_tile": TileConfig(4, 16, n, 4, 3)})
                         for n in (32, 128)]
        for label, kwargs in variants:
            out, fn = _run_triton(b, **kwargs)
            ms = triton.testing.do_bench(fn, return_mode="median")
            bw = kv_bytes / (ms * 1e-3)
            print(f"batch {batch:4d} ctx {context:5d} {label:22s} {ms * 1e3:8.1f} us "
                  f"{bw / 1e9:7.0f} GB/s ({bw / copy_bw:5.1%} of copy)  "
                  f"rel err vs SDPA {_rel_err(out, ref):.2e}")
        del b


def bench_prefill(sweep: bool) -> None:
    import triton.testing

    from engine_cuda.ops.attention import TileConfig

    print("\n# prefill (fresh prompts, causal)")
    for prompts, length in PREFILL_CASES:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        b = _paged_batch([length] * prompts, [length] * prompts, gen)
        flops = prompts * 4 * NUM_HEADS * HEAD_SIZE * length * length / 2  # causal half
        ref, sdpa_fn = _sdpa_reference(b)
        ms = triton.testing.do_bench(sdpa_fn, return_mode="median")
        print(f"{prompts} x {length:5d} torch SDPA (contiguous K/V)  {ms:7.3f} ms "
              f"{flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s")
        variants: list[tuple[str, dict]] = [("triton default", {})]
        if sweep:
            variants += [(f"block_m={m} block_n={n} warps={w}",
                          {"prefill_tile": TileConfig(m // 4, m, n, w, s)})
                         for m, n, w, s in ((128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2),
                                            (64, 32, 4, 3))]
        for label, kwargs in variants:
            out, fn = _run_triton(b, **kwargs)
            ms = triton.testing.do_bench(fn, return_mode="median")
            print(f"{prompts} x {length:5d} {label:30s} {ms:7.3f} ms "
                  f"{flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s  "
                  f"rel err vs SDPA {_rel_err(out, ref):.2e}")
        del b


def bench_mixed() -> None:
    """The one-launch mixed step against the same work as two launches (decodes alone with
    the decode tile, the prompt alone): what mixing costs the decodes."""
    import triton.testing

    prompt, decodes, context = MIXED_CASE
    print(f"\n# mixed step: 1 prompt of {prompt} + {decodes} decodes at context {context}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    mixed = _paged_batch([prompt] + [1] * decodes, [prompt] + [context] * decodes, gen)
    ref, _ = _sdpa_reference(mixed)
    out, fn = _run_triton(mixed)
    ms_mixed = triton.testing.do_bench(fn, return_mode="median")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    _, fn_decode = _run_triton(_paged_batch([1] * decodes, [context] * decodes, gen))
    _, fn_prompt = _run_triton(_paged_batch([prompt], [prompt], gen))
    ms_split = sum(triton.testing.do_bench(f, return_mode="median") for f in (fn_decode,
                                                                                fn_prompt))
    print(f"one launch {ms_mixed:7.3f} ms; decode-only + prompt-only launches "
          f"{ms_split:7.3f} ms; rel err vs SDPA {_rel_err(out, ref):.2e}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other tile sizes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops needs a CUDA GPU (torch.cuda.is_available() is False); run it on "
              "the GPU machine.", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs, "
          f"torch {torch.__version__}")
    bench_decode(args.sweep, copy_bandwidth())
    bench_prefill(args.sweep)
    bench_mixed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
