"""`POST /v1/completions`: one engine request per prompt (x n), streamed or collected.

Rule: every prompt of a batch is validated before any is submitted; choice indices are
`prompt_index * n + completion_index`, as OpenAI clients expect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from engine.engine_core.async_llm import ProcessedPrompt
from engine.entrypoints.openai.protocol import CompletionRequest
from engine.entrypoints.openai.serving_common import (
    ServerState,
    admission,
    check_prompt_chars,
    completion_logprobs,
    new_request_id,
    off_loop,
    usage,
)
from engine.entrypoints.openai.streaming import SSE_DONE, last_output, merge_async_iterators, sse
from engine.outputs.request_output import CompletionOutput, RequestOutput


def prepare(state: ServerState, request: CompletionRequest) -> list[ProcessedPrompt]:
    with admission(request):
        return _prepare(state, request)


def _prepare(state: ServerState, request: CompletionRequest) -> list[ProcessedPrompt]:
    engine = state.engine
    params = request.to_sampling_params(
        engine.input_processor.default_sampling_params(), request.max_tokens, request.logprobs,
        echo_logprobs=request.echo and request.logprobs is not None,
    )
    return [engine.process(prompt, params) for prompt in request.prompts()]


async def create_completion(state: ServerState, request: CompletionRequest) -> Any:
    """A response dict, or an async iterator of SSE lines when `stream` is set."""
    model = state.check_model(request.model)
    lora_request = state.lora_for(request.model)
    check_prompt_chars(state, sum(len(p) for p in request.prompts() if isinstance(p, str)),
                       "prompt")
    prompts = await off_loop(prepare, state, request)
    base_id = new_request_id("cmpl", request.request_id)
    ids = [base_id if len(prompts) == 1 else f"{base_id}-{i}" for i in range(len(prompts))]
    iterators = [state.engine.generate(p, None, rid, request.priority, request.user,
                                       lora_request)
                 for p, rid in zip(prompts, ids, strict=True)]
    if request.stream:
        return _stream(state, request, model, base_id, prompts, iterators)
    finals = await asyncio.gather(*(last_output(it) for it in iterators))
    choices = []
    num_completion_tokens = 0
    for i, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
        for completion in sorted(final.outputs, key=lambda c: c.index):
            num_completion_tokens += len(completion.token_ids)
            choices.append(_choice(state, request, i, prompt, final, completion, echo=True))
    num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return {"id": base_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": usage(num_prompt_tokens, num_completion_tokens)}


def _choice(state: ServerState, request: CompletionRequest, prompt_index: int,
            prompt: ProcessedPrompt, output: RequestOutput, completion: CompletionOutput,
            echo: bool) -> dict[str, Any]:
    """One choice; `echo` says whether to prepend the prompt (first chunk of a stream)."""
    echo = echo and request.echo
    text = completion.text
    logprobs = None
    prefix = (prompt.text or state.engine.tokenizer.decode(prompt.token_ids)) if echo else ""
    if request.logprobs is not None:
        token_ids = list(completion.token_ids)
        positions: list = list(completion.logprobs or [])
        if echo:
            prompt_positions = output.prompt_logprobs or [None] * len(prompt.token_ids)
            token_ids = list(prompt.token_ids) + token_ids
            positions = list(prompt_positions) + positions
        logprobs = completion_logprobs(state.engine.tokenizer, token_ids, positions)
    return {"index": prompt_index * request.n + completion.index, "text": prefix + text,
            "logprobs": logprobs, "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason}


async def _stream(state: ServerState, request: CompletionRequest, model: str, base_id: str,
                  prompts: list[ProcessedPrompt], iterators: list) -> AsyncIterator[str]:
    created = int(time.time())
    echoed: set[int] = set()
    num_completion_tokens = 0
    async for prompt_index, output in merge_async_iterators(iterators):
        choices = []
        for completion in output.outputs:
            num_completion_tokens += len(completion.token_ids)
            index = prompt_index * request.n + completion.index
            first = index not in echoed
            echoed.add(index)
            choices.append(_choice(state, request, prompt_index, prompts[prompt_index], output,
                                   completion, echo=first))
        if choices:
            yield sse({"id": base_id, "object": "text_completion", "created": created,
                       "model": model, "choices": choices})
    if request.include_usage:
        num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
        yield sse({"id": base_id, "object": "text_completion", "created": created,
                   "model": model, "choices": [],
                   "usage": usage(num_prompt_tokens, num_completion_tokens)})
    yield SSE_DONE
