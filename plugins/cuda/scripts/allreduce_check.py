"""All-reduce on one host's GPUs: the symmetric-memory one-shot path against NCCL, for
correctness (exact on small integers, close on random normals, eager and inside CUDA graphs)
and speed (median eager op, per-op time of 64 ops captured in one CUDA graph); then the fused
all-reduce + residual add + RMSNorm kernel against NCCL followed by the reference add + norm,
and its time per call in a graph against the two steps apart.

    python plugins/cuda/scripts/allreduce_check.py --world-size 2

Rule: one process per GPU builds the platform's real communicator (what an engine rank
uses) and every rank runs the same calls in the same order; rank 0 prints the table and the
final PASS/FAIL, and the exit code is nonzero on any mismatch, on a fast path that did not
set up, or on a rank that died or hung.
"""

from __future__ import annotations

import os

# Multicast (NVLS) can take a shared host's GPUs out of service: off before torch.distributed.
for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")

import argparse  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # engine_cuda from the checkout

KIB = 1024
BF16_SIZES = tuple(n * KIB for n in (2, 8, 32, 128, 512, 1024, 4096, 16384, 65536))
FP32_SIZE = 64 * KIB
BENCH_MAX_BYTES = max(BF16_SIZES)
EAGER_ITERS, GRAPH_OPS, GRAPH_REPLAYS = 200, 64, 20


@dataclass
class CheckResult:
    passed: bool
    text: str  # what rank 0 printed, or why no rank answered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eager_us(op: Callable[[], Any]) -> float:
    """Median of per-op times (CUDA events around each call)."""
    for _ in range(5):
        op()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(EAGER_ITERS)]
    for start, end in pairs:
        start.record()
        op()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1000.0


def _graph(op: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Per-op microseconds of GRAPH_OPS back-to-back calls captured in one graph and
    replayed GRAPH_REPLAYS times, and the graph's last output after the replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture, as torch.cuda.graph advises
        for _ in range(3):
            op()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_OPS):
            out = op()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GRAPH_REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) * 1000.0 / (GRAPH_REPLAYS * GRAPH_OPS)
    result = out.clone()
    del graph
    return us, result


def _inputs(rank: int, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random integers (sums exact in bf16) and random normals, different per rank."""
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    ints = torch.randint(-8, 9, (numel,), generator=gen, device="cuda").to(dtype)
    normals = torch.randn(numel, generator=gen, device="cuda").to(dtype)
    return ints, normals


def _mismatch(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool,
              world: int) -> list[str]:
    if got.shape != want.shape or got.dtype != want.dtype:
        return [f"{name}: shape/dtype {tuple(got.shape)} {got.dtype} != "
                f"{tuple(want.shape)} {want.dtype}"]
    g, w = got.float(), want.float()
    ok = torch.equal(g, w) if exact else torch.allclose(g, w, rtol=2e-2, atol=2e-2 * world)
    if ok:
        return []
    return [f"{name}: max |diff| {(g - w).abs().max().item():.4g} ({'exact' if exact else 'tol'})"]


def _rank_main(rank: int, world: int, port: int, results: Any) -> None:
    import torch.distributed as dist
    from engine_cuda.communicator import NcclCommunicator
    from engine_cuda.platform import CudaPlatform
    from engine_cuda.symm_allreduce import SymmAllReduce

    lines: list[str] = []
    errors: list[str] = []
    try:
        platform = CudaPlatform()
        device = platform.device(rank)
        platform.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        group = dist.group.WORLD
        comm = platform.communicator(group)          # what an engine rank gets
        nccl = NcclCommunicator(group, use_symm_mem=False)
        bench, why = SymmAllReduce.create(group, device, max_bytes=BENCH_MAX_BYTES)
        lines.append(f"world size {world}, torch {torch.__version__}, "
                     f"{torch.cuda.get_device_name(device)}")
        lines.append(f"NcclCommunicator all-reduce path: {comm.all_reduce_path}")
        fast = comm.fast_all_reduce
        if fast is None or bench is None:
            errors.append(f"fast path not set up: {comm.all_reduce_path}; bench: {why or 'ok'}")
        else:
            lines.append(f"one-shot variant: {'copy' if fast.uses_copy_op else 'stage+op'}")
            errors += _correctness_extras(comm, nccl, rank, world)
            header = (f"{'size':>9} {'dtype':>8} {'path':>5} {'eager us':>9} {'graph us':>9} "
                      f"{'bus GB/s':>9}  auto")
            lines.append(header)
            cases = [(n, torch.bfloat16) for n in BF16_SIZES] + [(FP32_SIZE, torch.float32)]
            for nbytes, dtype in cases:
                rows, errs = _one_size(comm, nccl, bench, rank, world, nbytes, dtype)
                lines += rows
                errors += errs
            rows, errs = _fused_norm(comm, nccl, rank, world)
            lines += rows
            errors += errs
    except BaseException:
        errors.append(f"rank {rank}: {traceback.format_exc()}")
    # every rank's verdict reaches rank 0 through the parent
    results.put((rank, lines, errors))
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the verdict is already out
        pass


def _correctness_extras(comm: Any, nccl: Any, rank: int, world: int) -> list[str]:
    """Inputs an engine may pass: a non-contiguous view, a view at an odd offset, fp16."""
    errors: list[str] = []
    ints, _ = _inputs(rank, 4096 * 4 + 8, torch.bfloat16)
    strided = ints[: 4096 * 4].view(4, 4096)[:, ::2]        # non-contiguous
    offset = ints[2: 2 + 4096]                              # 4-byte offset: staged copy
    half = ints[:4096].to(torch.float16)                    # NCCL (kernels lack fp16)
    for name, x in (("strided", strided), ("offset", offset), ("fp16", half)):
        errors += _mismatch(f"{name} auto vs nccl", comm.all_reduce(x), nccl.all_reduce(x),
                            True, world)
    return errors


def _one_size(comm: Any, nccl: Any, bench: Any, rank: int, world: int, nbytes: int,
              dtype: torch.dtype) -> tuple[list[str], list[str]]:
    numel = nbytes // torch.empty((), dtype=dtype).element_size()
    ints, normals = _inputs(rank, numel, dtype)
    size = f"{nbytes // KIB} KiB"
    errors: list[str] = []
    want_ints, want_normals = nccl.all_reduce(ints), nccl.all_reduce(normals)
    errors += _mismatch(f"{size} {dtype} symm ints", bench.all_reduce(ints), want_ints, True,
                        world)
    errors += _mismatch(f"{size} {dtype} symm normals", bench.all_reduce(normals),
                        want_normals, False, world)
    errors += _mismatch(f"{size} {dtype} auto ints", comm.all_reduce(ints), want_ints, True,
                        world)
    auto = "symm" if comm.fast_all_reduce.can_reduce(ints) else "nccl"
    rows = []
    for path, ar in (("nccl", nccl.all_reduce), ("symm", bench.all_reduce)):
        eager = _eager_us(lambda ar=ar: ar(ints))
        graph_us, graph_out = _graph(lambda ar=ar: ar(ints))
        errors += _mismatch(f"{size} {dtype} {path} in graph", graph_out, want_ints, True, world)
        bus = nbytes / (graph_us * 1e-6) * 2 * (world - 1) / world / 1e9
        mark = "*" if path == auto else ""
        rows.append(f"{size:>9} {str(dtype)[6:]:>8} {path:>5} {eager:9.1f} {graph_us:9.1f} "
                    f"{bus:9.1f}  {mark}")
    return rows, errors


def _fused_norm(comm: Any, nccl: Any, rank: int, world: int
                ) -> tuple[list[str], list[str]]:
    """All-reduce + residual add + RMSNorm in one kernel against NCCL's all-reduce followed
    by the reference add + norm: equal (bf16, fp32) eager and after many graph replays, and
    the time of both ways per call inside a graph."""
    from engine_cuda.ops.norm import fused_add_rms_norm as triton_add_norm

    from platforms.kernels import REFERENCE

    ref = REFERENCE["fused_add_rms_norm"]
    errors: list[str] = []
    fused = comm.fused_norm
    if fused is None:
        return [f"fused all-reduce + norm: not set up ({comm.all_reduce_path})"], [
            "fused all-reduce + norm did not set up"]
    lines = [f"{'rows':>9} {'dtype':>8} {'fused us':>9} {'apart us':>9}  (hidden 4096, in graph)"]
    for rows, dtype in ((1, torch.bfloat16), (4, torch.bfloat16), (32, torch.bfloat16),
                        (128, torch.bfloat16), (3, torch.float32)):
        gen = torch.Generator(device="cuda").manual_seed(99 + rows)
        residual = torch.randn(rows, 4096, generator=gen, device="cuda").to(dtype)
        weight = torch.rand(4096, generator=gen, device="cuda").to(dtype) + 0.5
        _, x = _inputs(rank, rows * 4096, dtype)
        x = x.view(rows, 4096)
        want_n, want_s = ref(nccl.all_reduce(x), residual, weight, 1e-5)
        tag = f"fused norm {rows}x4096 {dtype}"
        if not fused.can_fuse(x, residual, weight):
            errors.append(f"{tag}: not eligible")
            continue
        for it in range(3):  # both phases, and back
            got_n, got_s = comm.all_reduce_add_rms_norm(x, residual, weight, 1e-5, ref)
            errors += _mismatch(f"{tag} sum #{it}", got_s, want_s, False, world)
            errors += _mismatch(f"{tag} normed #{it}", got_n, want_n, False, world)
        fused_us, out = _graph(lambda x=x, r=residual, w=weight: fused(x, r, w, 1e-5)[0])
        errors += _mismatch(f"{tag} in graph", out, want_n, False, world)
        apart_us, out = _graph(
            lambda x=x, r=residual, w=weight: triton_add_norm(comm.all_reduce(x), r, w, 1e-5)[0])
        errors += _mismatch(f"{tag} apart in graph", out, want_n, False, world)
        lines.append(f"{rows:>9} {str(dtype)[6:]:>8} {fused_us:9.1f} {apart_us:9.1f}")
    return lines, errors


def run_check(world_size: int, timeout_s: float = 240.0) -> CheckResult:
    """Spawn one rank per GPU, run the checks, and return rank 0's table and the verdict."""
    if torch.cuda.device_count() < world_size:
        return CheckResult(False, f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    answers: dict[int, tuple[list[str], list[str]]] = {}
    problems: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(answers) < world_size:
            try:
                rank, lines, errors = results.get(timeout=0.5)
                answers[rank] = (lines, errors)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in answers and p.exitcode not in (None, 0)]
                if dead:
                    problems += [f"rank {r} exited with code {procs[r].exitcode}" for r in dead]
                    break
                if time.monotonic() > deadline:
                    problems.append(f"no answer from every rank within {timeout_s:.0f} s "
                                    f"(answered: {sorted(answers)})")
                    break
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    lines = list(answers.get(0, ([], []))[0])
    for rank in sorted(answers):
        problems += [f"rank {rank}: {e}" for e in answers[rank][1]]
    lines += [f"MISMATCH/ERROR {p}" for p in problems]
    lines.append("PASS" if not problems else f"FAIL ({len(problems)} problems)")
    return CheckResult(not problems, "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds before hung ranks are killed")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = run_check(args.world_size, args.timeout)
    print(result.text)
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
