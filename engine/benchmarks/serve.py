"""`engine bench serve`: load a running `engine serve` the way real clients do, and time it.

Rule: the workload is fixed before the clock starts (seeded random token prompts or a
prompts file) and every request streams, so TTFT and inter-token latency are what a client
sees; `ignore_eos` makes each request produce exactly `--output-len` tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

Prompt = Union[str, list[int]]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: Optional[str] = None


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="Server to load (default: http://127.0.0.1:8000).")
    parser.add_argument("--model", default=None,
                        help="Model name to send (default: the server's first model).")
    parser.add_argument("--api-key", default=None, help="Bearer key, if the server needs one.")
    parser.add_argument("--prompts-file", default=None,
                        help="Text file, one prompt per line (default: random token prompts).")
    parser.add_argument("--num-prompts", type=int, default=64, help="Requests to send (64).")
    parser.add_argument("--input-len", type=int, default=128,
                        help="Tokens per random prompt (128).")
    parser.add_argument("--output-len", type=int, default=128,
                        help="Tokens to generate per request (128).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random prompts (0).")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrival rate in requests/s (default: inf = all at once).")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="Most requests in flight (default: no limit).")
    parser.add_argument("--offline-model", default=None,
                        help="Also run the same workload through LLM.generate in one batch "
                        "on this model path and print the serve/offline throughput ratio.")
    parser.add_argument("--offline-max-num-seqs", type=int, default=None,
                        help="max_num_seqs of the offline run (default: --max-concurrency, so "
                        "both runs batch the same number of requests).")
    parser.add_argument("--offline-kv-cache-memory", default=None,
                        help="kv_cache_memory of the offline run (e.g. 1g; default: the "
                        "platform's choice).")


def make_prompts(args: argparse.Namespace) -> list[Prompt]:
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if not lines:
            raise ValueError(f"--prompts-file {args.prompts_file} has no prompts.")
        return [lines[i % len(lines)] for i in range(args.num_prompts)]
    rng = random.Random(args.seed)
    # Ids in a range every common vocabulary has, away from special tokens at the start.
    return [[rng.randrange(100, 10000) for _ in range(args.input_len)]
            for _ in range(args.num_prompts)]


async def _one_request(client: Any, url: str, body: dict[str, Any]) -> RequestResult:
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = True
    except Exception as exc:  # reported in the summary; the run goes on
        result.error = repr(exc)
    return result


async def _run(args: argparse.Namespace, prompts: list[Prompt], model: str,
               ) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency
    semaphore = asyncio.Semaphore(limit) if limit else None
    rng = random.Random(args.seed + 1)
    url = args.base_url.rstrip("/") + "/v1/completions"

    async def limited(client: Any, prompt: Prompt) -> RequestResult:
        body = {"model": model, "prompt": prompt, "max_tokens": args.output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if semaphore is None:
            return await _one_request(client, url, body)
        async with semaphore:
            return await _one_request(client, url, body)

    timeout = httpx.Timeout(None)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(client, prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return sum(ordered) / len(ordered), pick(0.5), pick(0.99)


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itls]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "requests_per_s": len(ok) / duration, "output_tokens_per_s": output_tokens / duration,
        "output_tokens": output_tokens,
        "ttft_ms": [1000 * x for x in _percentiles([r.ttft for r in ok])],
        "tpot_ms": [1000 * x for x in _percentiles(tpots)],
        "itl_ms": [1000 * x for x in _percentiles(itls)],
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'completed / failed':<24}{summary['completed']} / {summary['failed']}")
    print(f"{'duration (s)':<24}{summary['duration_s']:.2f}")
    print(f"{'requests/s':<24}{summary['requests_per_s']:.2f}")
    print(f"{'output tokens/s':<24}{summary['output_tokens_per_s']:.1f}")
    print(f"{'(ms)':<12}{'mean':>10}{'p50':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl"):
        mean, p50, p99 = summary[f"{name}_ms"]
        print(f"{name.upper():<12}{mean:>10.1f}{p50:>10.1f}{p99:>10.1f}")
    for error in summary["errors"]:
        print(f"error: {error}")


def _server_model(args: argparse.Namespace) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    response = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def run_offline(args: argparse.Namespace, prompts: list[Prompt]) -> float:
    """Output tokens/s of the same workload through `LLM.generate` in one batch."""
    from engine import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    max_num_seqs = args.offline_max_num_seqs or args.max_concurrency
    if max_num_seqs:
        kwargs["max_num_seqs"] = max_num_seqs
    if args.offline_kv_cache_memory:
        kwargs["kv_cache_memory"] = args.offline_kv_cache_memory
    llm = LLM(model=args.offline_model, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    duration = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / duration


def main(args: argparse.Namespace) -> int:
    prompts = make_prompts(args)
    model = args.model or _server_model(args)
    results, duration = asyncio.run(_run(args, prompts, model))
    summary = summarize(results, duration)
    print_table(summary)
    if args.offline_model:
        offline = run_offline(args, prompts)
        ratio = summary["output_tokens_per_s"] / offline
        print(f"{'offline tokens/s':<24}{offline:.1f}")
        print(f"{'serve / offline':<24}{ratio:.3f}")
    return 0 if summary["failed"] == 0 else 1
