"""`engine bench throughput`: offline throughput, with HF transformers as the peer in the same run.

Rule: results are ratios against a peer measured in the same process on the same prompts.
Prompts are random token ids drawn with a fixed seed (or lines of a given file). Every
request must produce exactly its output length (`ignore_eos`), so both sides do the same
work; HF `generate` pads the batch to the longest prompt and decodes until the longest
request is done, and only the tokens each request asked for count as useful output.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, replace
from typing import Optional

from engine.benchmarks import print_columns
from engine.entrypoints.args import add_engine_args, engine_args_from_namespace


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int  # useful output tokens (what the requests asked for)

    def row(self) -> list[str]:
        return [
            self.name,
            f"{self.seconds:.2f}",
            f"{self.num_requests / self.seconds:.2f}",
            f"{(self.prompt_tokens + self.output_tokens) / self.seconds:.1f}",
            f"{self.output_tokens / self.seconds:.1f}",
        ]


def _parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def make_workload(
    tokenizer, num_prompts: int, input_len: str, output_len: str, seed: int,
    dataset: Optional[str] = None,
) -> Workload:
    rng = random.Random(seed)
    in_lo, in_hi = _parse_range(input_len)
    out_lo, out_hi = _parse_range(output_len)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    prompts: list[list[int]] = []
    if dataset:
        with open(dataset, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        for i in range(num_prompts):
            prompts.append(tokenizer.encode(lines[i % len(lines)]))
    else:
        for _ in range(num_prompts):
            n = rng.randint(in_lo, in_hi)
            prompts.append([rng.choice(vocab) for _ in range(n)])
    output_lens = [rng.randint(out_lo, out_hi) for _ in range(num_prompts)]
    return Workload(prompts, output_lens)


def run_engine(llm, workload: Workload, ignore_eos: bool = True,
               schema: Optional[dict] = None, lengths: Optional[list[int]] = None,
               cached_prompts: bool = False) -> Result:
    """`schema`: every request's output is constrained to this JSON schema (its outputs
    then end when their JSON does, so only the tokens produced are counted; `lengths`, if
    given, receives each output's length). The prefix cache is emptied first, so the
    prompts are prefilled as the workload says, unless `cached_prompts` (the prompts were
    run before and stay cached: the run times decoding, almost)."""
    from engine.sampling_params import SamplingParams, StructuredOutputsParams

    if not cached_prompts:
        llm.reset_prefix_cache()

    constraint = None if schema is None else StructuredOutputsParams(json=schema)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n,
                       min_tokens=n if ignore_eos and schema is None else 0,
                       ignore_eos=ignore_eos, structured_outputs=constraint)
        for n in workload.output_lens
    ]
    t0 = time.perf_counter()
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=False
    )
    seconds = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if lengths is not None:
        lengths[:] = [len(o.outputs[0].token_ids) for o in outputs]
    if schema is not None:
        return Result("engine + json schema", seconds, len(workload.prompts),
                      workload.num_prompt_tokens, produced)
    if ignore_eos and produced != workload.num_output_tokens:
        raise RuntimeError(f"engine produced {produced} tokens, expected "
                           f"{workload.num_output_tokens}")
    return Result("engine", seconds, len(workload.prompts), workload.num_prompt_tokens, produced)


def _load_schema(text: str) -> dict:
    import json
    import os

    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    return json.loads(text)


def _first_token_times(llm, prompt: list[int], schema: dict) -> list[str]:
    """Time to the first token of one request: no constraint; the first constrained request
    the engine sees (its grammar backend starts: tokenizer and vocabulary tables); a schema
    never seen (its grammar compiles first); the same schema again (compiled: cached)."""
    import copy
    import uuid

    from engine.sampling_params import SamplingParams, StructuredOutputsParams

    def fresh() -> dict:  # a schema nobody compiled yet: same shape, new title
        out = copy.deepcopy(schema)
        out["title"] = f"first-seen-{uuid.uuid4().hex}"
        return out

    seen = fresh()
    times = {}
    for name, constraint in (("none", None), ("first constrained request", fresh()),
                             ("first-seen schema", seen), ("seen schema", seen)):
        params = SamplingParams(temperature=0.0, max_tokens=1, structured_outputs=None
                                if constraint is None else StructuredOutputsParams(json=constraint))
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        times[name] = (time.perf_counter() - t0) * 1000
    return ["time to first token, one request: " + ", ".join(
        f"{name} {ms:.1f} ms" for name, ms in times.items())]


def load_hf_model(model_config, dtype, device=None):
    """The same weights through HF transformers (GGUF files are dequantized by HF itself),
    on `device`; with dummy weights, HF's own random init of the same config (the same
    shapes, so the same work)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    if model_config.load_format == "dummy":
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(model_config.hf_config, dtype=dtype)
        return model.eval()
    if model_config.load_format == "gguf":
        path = model_config.gguf_file
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_config.model, dtype=dtype)
    return model.to(device or "cpu").eval()


def free_engine(llm) -> None:
    """Drop the engine's weights, KV cache and graphs, so a peer measured after it in the
    same process can reuse that device memory (through the framework's allocator cache)."""
    import gc

    llm.core.shutdown()
    runner = getattr(llm.core.executor, "runner", None)
    if runner is not None:  # the graph runner holds the forward (and captured graphs)
        runner.forward = None
    gc.collect()


def run_hf(model, workload: Workload, pad_token_id: int, batch_size: int,
           synchronize=None) -> Result:
    """HF `generate`, batched and left-padded; each batch decodes to its longest output."""
    import torch

    device = next(model.parameters()).device
    t0 = time.perf_counter()
    order = list(range(len(workload.prompts)))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        prompts = [workload.prompts[i] for i in idx]
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(idx), longest), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, longest - len(p):] = torch.tensor(p)
            mask[row, longest - len(p):] = 1
        new_tokens = max(workload.output_lens[i] for i in idx)
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=pad_token_id,
            )
    if synchronize is not None:
        synchronize()
    seconds = time.perf_counter() - t0
    return Result("hf-transformers", seconds, len(workload.prompts),
                  workload.num_prompt_tokens, workload.num_output_tokens)


def subset(workload: Workload, num_prompts: Optional[int]) -> Workload:
    """The first `num_prompts` requests (all when None)."""
    if num_prompts is None or num_prompts >= len(workload.prompts):
        return workload
    return Workload(workload.prompts[:num_prompts], workload.output_lens[:num_prompts])


def print_table(results: list[Result]) -> None:
    print_columns([["runner", "seconds", "requests/s", "total tok/s", "output tok/s"]] + [r.row() for r in results])
    peers = [r for r in results if r.name == "hf-transformers"]
    if peers:
        a, b = results[0], peers[0]
        ratio = (a.output_tokens / a.seconds) / (b.output_tokens / b.seconds)
        print(f"useful output tokens/s ratio {a.name} / {b.name}: {ratio:.2f}x")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Model path or hub id.")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", default="128", help="Tokens per prompt: N or LO:HI.")
    parser.add_argument("--output-len", default="128", help="Tokens per output: N or LO:HI.")
    parser.add_argument("--dataset", default=None, help="Text file, one prompt per line.")
    parser.add_argument("--bench-seed", type=int, default=0, help="Seed of the workload.")
    parser.add_argument("--hf-peer", action=argparse.BooleanOptionalAction, default=True,
                        help="Also run HF transformers generate on the same prompts.")
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="HF generate batch size (default: all prompts at once).")
    parser.add_argument("--hf-num-prompts", type=int, default=None,
                        help="Run the HF peer on the first N prompts only, when the whole "
                        "workload would take it too long (rates stay comparable per token).")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="Every request produces exactly its output length.")
    parser.add_argument("--structured-json", default=None, metavar="SCHEMA",
                        help="Also run the workload with every output constrained to this JSON "
                        "schema (a file or the JSON text): output tokens/s ratio, and the time "
                        "to first token of a schema seen for the first time vs none.")
    from engine.benchmarks import roofline

    parser.add_argument("--structured-repeats", type=int, default=3,
                        help="With --structured-json: timed pairs (constrained, then plain) "
                        "per ratio; the median is printed, the rows are the last pair's.")
    roofline.add_ceiling_args(parser, default=False, measures="compute roofline (2 x non-embedding params flop per token)")
    add_engine_args(parser)


def main(args: argparse.Namespace) -> int:
    from engine.benchmarks import roofline
    from engine.benchmarks.dummy_tokenizer import tokenizer_override
    from engine.entrypoints.llm import LLM

    tokenizer = tokenizer_override(args.model, args.load_format, args.tokenizer)
    engine_args = engine_args_from_namespace(args, model=args.model, tokenizer=tokenizer)
    t0 = time.perf_counter()
    llm = LLM(**engine_args.model_dump())
    print(f"engine startup: {time.perf_counter() - t0:.2f} s")
    print(roofline.startup_line(llm.core.startup_timings))
    tokenizer = llm.get_tokenizer()
    workload = make_workload(tokenizer, args.num_prompts, args.input_len, args.output_len,
                             args.bench_seed, args.dataset)
    print(f"workload: {len(workload.prompts)} prompts, {workload.num_prompt_tokens} prompt "
          f"tokens, {workload.num_output_tokens} output tokens")
    results = [run_engine(llm, workload, args.ignore_eos)]
    structured_lines: list[str] = []
    if args.structured_json:
        # The first pass also warms the engine (the KV cache's pages are touched on first
        # use): the plain run that is compared comes after, next to the constrained one.
        # The plain run compared is the same requests with the output lengths the schema
        # gave, so both runs do the same work but for the constraint.
        schema = _load_schema(args.structured_json)
        # First the one-request times (which also start the grammar backend, so the timed
        # run below measures decoding under the constraint, not the backend's start).
        first_token = _first_token_times(llm, workload.prompts[0], schema)
        lengths: list[int] = []
        ratios: dict[str, list[float]] = {"the workload": [], "cached prompts (decoding)": []}
        for _ in range(args.structured_repeats):  # pairs in turn: drift hits both sides
            constrained = run_engine(llm, workload, args.ignore_eos, schema=schema,
                                     lengths=lengths)
            same = Workload(workload.prompts, lengths)
            matched = replace(run_engine(llm, same, ignore_eos=True),
                              name="engine, same lengths")
            # Again with the prompts cached: nearly all decoding, where the grammar costs
            # most.
            decode_c = replace(run_engine(llm, workload, args.ignore_eos, schema=schema,
                                          cached_prompts=True),
                               name="engine + json schema, cached prompts")
            decode_m = replace(run_engine(llm, same, ignore_eos=True, cached_prompts=True),
                               name="engine, same lengths, cached prompts")
            for what, (c, m) in (("the workload", (constrained, matched)),
                                 ("cached prompts (decoding)", (decode_c, decode_m))):
                ratios[what].append((c.output_tokens / c.seconds) /
                                    (m.output_tokens / m.seconds))
        results.extend([constrained, matched, decode_c, decode_m])
        for what, values in ratios.items():
            values.sort()
            spread = f" ({values[0]:.2f}-{values[-1]:.2f})" if len(values) > 1 else ""
            structured_lines.append(
                f"output tokens/s ratio with / without the json schema (same requests, same "
                f"output lengths), {what}: {statistics.median(values):.2f}"
                f"{spread}, median of {len(values)}")
        structured_lines.extend(first_token)
    platform, model_config = llm.core.platform, llm.config.model
    num_params = roofline.non_embedding_params(roofline.counted_model(llm))
    llm_tp = llm.config.parallel.tensor_parallel_size
    free_engine(llm)
    del llm
    ceilings = None
    if args.ceilings:
        ceilings = roofline.measure(platform, args.roofline_copy_mib << 20,
                                    args.roofline_matmul_size)
    if args.hf_peer:
        peer = subset(workload, args.hf_num_prompts)
        if peer is not workload:
            print(f"hf-transformers runs the first {len(peer.prompts)} of "
                  f"{len(workload.prompts)} prompts (--hf-num-prompts)")
        hf_model = load_hf_model(model_config, model_config.dtype, platform.device())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        results.append(run_hf(hf_model, peer, pad, args.hf_batch_size or len(peer.prompts),
                              platform.synchronize))
    print_table(results)
    for line in structured_lines:
        print(line)
    if ceilings is not None:
        engine = results[0]
        total = (engine.prompt_tokens + engine.output_tokens) / engine.seconds
        for line in ceilings.lines():
            print(line)
        print(f"non-embedding parameters: {num_params:,}")
        # Tensor-parallel ranks each multiply through their shard, all at once.
        tp = llm_tp
        print(roofline.compute_roofline(num_params // tp, ceilings, total).line()
              + (f" (tensor parallel {tp}: per-device shard)" if tp > 1 else ""))
    return 0
