"""`engine bench latency`: time per output token of one small batch, against the bandwidth
roofline measured in the same run, with HF transformers as the peer.

Rule: both runners do the same work: the same random prompts (batch of `--batch-size`, each
`--input-len` tokens) decode exactly `--output-len` tokens, greedy, EOS ignored. Each side's
TTFT is the median time of a one-token generate, its end-to-end time the median of full ones,
both after warm-up; time per output token is TPOT = (e2e - TTFT) / (output_len - 1).
The engine is freed before the ceilings and the peer run, so they reuse its device memory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.benchmarks import print_columns, roofline
from engine.benchmarks.throughput import free_engine, load_hf_model, make_workload
from engine.entrypoints.args import add_engine_args, engine_args_from_namespace


@dataclass(frozen=True)
class Latency:
    name: str
    ttft_s: float
    e2e_s: float
    output_len: int
    batch_size: int

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / max(self.output_len - 1, 1)

    def row(self) -> list[str]:
        return [
            self.name,
            f"{1000 * self.ttft_s:.2f}",
            f"{1000 * self.tpot_s:.3f}",
            f"{self.e2e_s:.3f}",
            f"{self.batch_size * self.output_len / self.e2e_s:.1f}",
        ]


def _median_seconds(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_engine(llm, prompts: list[list[int]], output_len: int, warmup: int,
                   iters: int) -> Latency:
    from engine.sampling_params import SamplingParams

    def run(n: int) -> Callable[[], object]:
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        batch = [{"prompt_token_ids": p} for p in prompts]

        def go() -> None:
            outs = llm.generate(batch, params, use_tqdm=False)
            produced = [len(o.outputs[0].token_ids) for o in outs]
            if produced != [n] * len(prompts):
                raise RuntimeError(f"engine produced {produced} tokens, expected {n} each")
        return go

    ttft = _median_seconds(run(1), warmup, iters)
    e2e = _median_seconds(run(output_len), warmup, iters)
    return Latency("engine", ttft, e2e, output_len, len(prompts))


def measure_hf(model, prompts: list[list[int]], output_len: int, warmup: int, iters: int,
               synchronize: Callable[[], None]) -> Latency:
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)  # equal lengths
    mask = torch.ones_like(input_ids)

    def run(n: int) -> Callable[[], object]:
        def go() -> None:
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=0)
            synchronize()
            if out.shape[1] != input_ids.shape[1] + n:
                raise RuntimeError(f"HF produced {out.shape[1] - input_ids.shape[1]} tokens, "
                                   f"expected {n}")
        return go

    ttft = _median_seconds(run(1), warmup, iters)
    e2e = _median_seconds(run(output_len), warmup, iters)
    return Latency("hf-transformers", ttft, e2e, output_len, len(prompts))


def print_table(results: list[Latency]) -> None:
    print_columns([["runner", "TTFT ms", "TPOT ms", "e2e s", "output tok/s"]] + [r.row() for r in results])
    if len(results) == 2:
        engine, peer = results
        print(f"TPOT ratio {peer.name} / {engine.name}: {peer.tpot_s / engine.tpot_s:.2f}x "
              f"(higher: the engine is faster)")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Model path (HF directory, config-only directory with "
                        "--load-format dummy, GGUF file) or hub id.")
    parser.add_argument("--input-len", type=int, default=128, help="Tokens per prompt.")
    parser.add_argument("--output-len", type=int, default=256, help="Tokens decoded per prompt.")
    parser.add_argument("--batch-size", type=int, default=1, help="Prompts decoded together.")
    parser.add_argument("--num-iters-warmup", type=int, default=2)
    parser.add_argument("--num-iters", type=int, default=5, help="Timed runs (median).")
    parser.add_argument("--bench-seed", type=int, default=0, help="Seed of the prompts.")
    parser.add_argument("--hf-peer", action=argparse.BooleanOptionalAction, default=True,
                        help="Also run HF transformers generate on the same prompts.")
    parser.add_argument("--hf-num-iters", type=int, default=None,
                        help="Timed runs of the HF peer (default: --num-iters).")
    roofline.add_ceiling_args(parser, default=True, measures="bandwidth roofline")
    add_engine_args(parser)


def main(args: argparse.Namespace) -> int:
    from engine.entrypoints.llm import LLM

    if args.output_len < 2:
        raise ValueError(f"--output-len {args.output_len} leaves no decode step to time; "
                         f"pass 2 or more.")
    from engine.benchmarks.dummy_tokenizer import tokenizer_override

    tokenizer = tokenizer_override(args.model, args.load_format, args.tokenizer)
    engine_args = engine_args_from_namespace(args, model=args.model, tokenizer=tokenizer)
    llm = LLM(**engine_args.model_dump())
    platform, model_config = llm.core.platform, llm.config.model
    print(f"platform: {platform.name} ({platform.device()}), dtype "
          f"{str(model_config.dtype).removeprefix('torch.')}")
    print(f"engine startup: {llm.startup_seconds:.2f} s; "
          + roofline.startup_line(llm.core.startup_timings))
    workload = make_workload(llm.get_tokenizer(), args.batch_size, str(args.input_len),
                             str(args.output_len), args.bench_seed)
    prompts = workload.prompts
    model = roofline.counted_model(llm)
    # Each tensor-parallel rank reads its own shard, all ranks at once.
    weight_bytes = roofline.decode_weight_bytes(model) // llm.config.parallel.tensor_parallel_size
    results = [measure_engine(llm, prompts, args.output_len, args.num_iters_warmup,
                              args.num_iters)]
    del model
    free_engine(llm)
    del llm

    ceilings = None
    if args.ceilings:
        ceilings = roofline.measure(platform, args.roofline_copy_mib << 20,
                                    args.roofline_matmul_size)
    if args.hf_peer:
        hf_model = load_hf_model(model_config, model_config.dtype, platform.device())
        results.append(measure_hf(hf_model, prompts, args.output_len, args.num_iters_warmup,
                                  args.hf_num_iters or args.num_iters, platform.synchronize))
        del hf_model
    print(f"batch {args.batch_size}, {args.input_len} in / {args.output_len} out, median of "
          f"{args.num_iters} after {args.num_iters_warmup} warm-up")
    print_table(results)
    if ceilings is not None:
        for line in ceilings.lines():
            print(line)
        print(f"weights read per decode step: {weight_bytes / 1e9:.3f} GB (input embedding "
              f"excepted)")
        print(roofline.bandwidth_roofline(weight_bytes, ceilings, results[0].tpot_s).line())
    return 0
