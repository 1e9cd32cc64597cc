"""GPU smoke check of the CUDA platform: one command, under a minute, offline.

Rule: every section runs even if an earlier one failed, prints PASS/FAIL with its numbers
(and the traceback of any exception), and the exit status is the number of failed sections.

    python plugins/cuda/scripts/gpu_smoke.py            # from the repository root

Sections: platform basics and memory; the attention conformance kit (bf16); the graph
runner kit (replay vs eager, bf16 and fp32); LLM.generate on a small random Llama (4 layers,
GQA) with --enforce-eager vs CUDA graphs, comparing greedy tokens and timing startup and
generation; KV-cache sizing from the profiling step.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # plugins/cuda: engine_cuda without installing
sys.path.insert(0, str(HERE.parents[3]))  # the repository root: engine, platforms

import torch  # noqa: E402

SMALL_LLAMA = {  # 4 layers, GQA 4:1, head size 64: small, but every code path
    "num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1408,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 2048, "max_position_embeddings": 1024, "torch_dtype": "bfloat16",
}
RESULTS: list[tuple[str, bool, str]] = []


def section(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def wrap(fn: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            print(f"\n=== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                detail = fn()
                ok = True
            except Exception:  # report and go on to the next section
                traceback.print_exc()
                detail, ok = "exception (traceback above)", False
            detail = f"{detail} [{time.perf_counter() - t0:.1f} s]"
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
            RESULTS.append((name, ok, detail))
            gc.collect()
            torch.cuda.empty_cache()
            return detail
        return run
    return wrap


def model_dir(root: Path) -> Path:
    """Config-only small Llama (dummy weights) with an offline word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from platforms.testing import write_tiny_llama

    directory = write_tiny_llama(root / "small-llama", **SMALL_LLAMA)
    vocab = {f"t{i}": i for i in range(SMALL_LLAMA["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t1",
                            unk_token="t0").save_pretrained(directory)
    return directory


@section("platform: selection, memory, events, describe")
def platform_basics() -> str:
    from engine_cuda.platform import CudaPlatform

    from platforms.testing import check_device, check_events, check_memory_info

    assert CudaPlatform.is_available(), "CudaPlatform.is_available() is False"
    platform = CudaPlatform()
    check_device(platform)
    free, total = check_memory_info(platform)
    ms = check_events(platform)
    print(platform.describe())
    return (f"{torch.cuda.get_device_name(0)}, free {free / 2**30:.1f} / {total / 2**30:.1f} "
            f"GiB, event {ms:.3f} ms")


@section("attention kit (bf16, all cases)")
def attention_kit() -> str:
    from engine_cuda.platform import CudaPlatform

    from platforms.testing import ATTENTION_CASES, check_attention_against_reference

    worst = max(check_attention_against_reference(CudaPlatform(), case, dtype=torch.bfloat16)
                for case in ATTENTION_CASES)
    return f"max abs error {worst:.3g}"


@section("kernel overrides kit (fp32, bf16)")
def kernel_kit() -> str:
    from engine_cuda.platform import CudaPlatform

    from platforms.testing import check_kernel_overrides

    worst = check_kernel_overrides(CudaPlatform(), dtypes=(torch.float32, torch.bfloat16))
    return ", ".join(f"{k} {v:.2g}" for k, v in worst.items())


def graph_kit(dtype: torch.dtype) -> Callable[[], str]:
    @section(f"graph runner kit: replay vs eager ({str(dtype).removeprefix('torch.')})")
    def run() -> str:
        from engine_cuda.platform import CudaPlatform

        from platforms.testing import DEFAULT_BATCHES, check_graph_runner, write_tiny_llama

        batches = (*DEFAULT_BATCHES, tuple((i % 10 * 3 + 2, 1) for i in range(33)),
                   ((0, 100), (20, 30), *((j, 1) for j in range(5, 25))),
                   ((0, 250), (0, 250), (3, 100)))
        with tempfile.TemporaryDirectory() as tmp:
            worst = check_graph_runner(CudaPlatform(), write_tiny_llama(Path(tmp) / "m"),
                                       dtype=dtype, batches=batches, num_blocks=128)
        return f"max abs diff {worst:.3g}"
    return run


def generate(directory: Path, dtype: str, enforce_eager: bool) -> tuple[list, float, float]:
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(directory), load_format="dummy", dtype=dtype, max_model_len=1024,
              enforce_eager=enforce_eager, kv_cache_memory=512 << 20, max_num_seqs=64,
              max_num_batched_tokens=256)
    startup = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": [(7 * i + j) % 2000 + 2 for j in range(5 + 9 * i)]}
               for i in range(32)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # first-call costs out of the timing
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t1
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    llm.core.shutdown()
    del llm
    return tokens, startup, elapsed


def generation(dtype: str, must_match: bool) -> Callable[[], str]:
    @section(f"LLM.generate eager vs CUDA graphs ({dtype}, 32 prompts x 48 tokens)")
    def run() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            directory = model_dir(Path(tmp))
            eager, eager_start, eager_s = generate(directory, dtype, enforce_eager=True)
            gc.collect()
            torch.cuda.empty_cache()
            graphs, graph_start, graph_s = generate(directory, dtype, enforce_eager=False)
        same = sum(a == b for a, b in zip(eager, graphs, strict=True))
        first_diff = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
                      for a, b in zip(eager, graphs)]
        detail = (f"{same}/{len(eager)} completions equal (first differing step per prompt: "
                  f"{[d for d in first_diff if d is not None][:8]}); startup eager "
                  f"{eager_start:.1f} s, graphs {graph_start:.1f} s; generate eager "
                  f"{eager_s:.2f} s, graphs {graph_s:.2f} s")
        if must_match:
            assert same == len(eager), detail
        return detail
    return run


@section("KV cache sized by the profiling step (gpu_memory_utilization 0.5)")
def profiled_sizing() -> str:
    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir(Path(tmp))
        llm = LLM(model=str(directory), load_format="dummy", dtype="bfloat16",
                  max_model_len=1024, gpu_memory_utilization=0.5, max_num_seqs=64)
        _, total = torch.cuda.mem_get_info()
        used = torch.cuda.memory_reserved()
        num_blocks = llm.core.num_blocks
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                           SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
        llm.core.shutdown()
    share = used / total
    assert 0.3 < share <= 0.55, f"torch reserved {share:.0%} of the GPU; expected about 50%"
    return f"{num_blocks} blocks; torch reserved {used / 2**30:.1f} GiB = {share:.0%} of the GPU"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU visible; run it on a GPU machine.")
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    for run in (platform_basics, attention_kit, kernel_kit, graph_kit(torch.bfloat16),
                graph_kit(torch.float32), generation("float32", must_match=True),
                generation("bfloat16", must_match=False), profiled_sizing):
        run()
    print(f"\n=== summary ({time.perf_counter() - t0:.1f} s)")
    for name, ok, detail in RESULTS:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    return sum(not ok for _, ok, _ in RESULTS)


if __name__ == "__main__":
    sys.exit(main())
