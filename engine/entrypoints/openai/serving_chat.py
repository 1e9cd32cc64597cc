"""`POST /v1/chat/completions`: messages -> chat template -> one engine request (x n).

Rule: the template already holds the special tokens, so its text is tokenized without
adding any; the first streamed delta of each choice carries the role. Tools and reasoning
(chat_output.py) shape each choice's text into content, reasoning_content and tool_calls.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional

from engine.engine_core.async_llm import ProcessedPrompt
from engine.entrypoints.openai.chat_output import (
    ChoiceOutput,
    ToolPlan,
    finish_reason,
    plan_tools,
)
from engine.entrypoints.openai.protocol import ChatCompletionRequest
from engine.entrypoints.openai.serving_common import (
    ServerState,
    admission,
    chat_logprobs,
    check_prompt_chars,
    message_chars,
    new_request_id,
    off_loop,
    usage,
)
from engine.entrypoints.openai.streaming import SSE_DONE, last_output, sse
from engine.inputs import template_message
from engine.outputs.request_output import CompletionOutput, RequestOutput
from engine.sampling_params import InvalidParameter


def prepare(state: ServerState, request: ChatCompletionRequest
            ) -> tuple[ProcessedPrompt, ToolPlan, bool]:
    """The engine request, the tool plan, and whether the output starts inside reasoning."""
    with admission(request):
        return _prepare(state, request)


def _prepare(state: ServerState, request: ChatCompletionRequest
             ) -> tuple[ProcessedPrompt, ToolPlan, bool]:
    engine = state.engine
    plan = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls,
                      state.tool_call_parser)
    text = engine.input_processor.apply_chat_template(
        [template_message(m.model_dump(exclude_none=True), i)
         for i, m in enumerate(request.messages)],
        add_generation_prompt=request.add_generation_prompt,
        chat_template_kwargs=request.chat_template_kwargs,
        continue_final_message=request.continue_final_message,
        tools=plan.tools,
    )
    token_ids = engine.tokenizer.encode(text, add_special_tokens=False)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = request.to_sampling_params(
        engine.input_processor.default_sampling_params(), request.effective_max_tokens,
        logprobs, echo_logprobs=False,
    )
    if plan.constraint is not None:
        if params.structured_outputs is not None:
            raise InvalidParameter("tool_choice", f"tool_choice={request.tool_choice!r} "
                                   "constrains the output to a tool call; it cannot be combined "
                                   "with response_format or structured_outputs.")
        params.structured_outputs = plan.constraint
    if plan.parser is not None and not plan.parser.skip_special_tokens:
        params.skip_special_tokens = False  # the parser's call marker is a special token
    reasoning = state.reasoning_parser
    open_at_start = reasoning is not None and reasoning.opens_reasoning(text)
    return engine.process(token_ids, params, prompt_text=text), plan, open_at_start


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest) -> Any:
    """A response dict, or an async iterator of SSE lines when `stream` is set."""
    model = state.check_model(request.model)
    check_prompt_chars(state, message_chars(request.messages), "messages")
    prompt, plan, open_at_start = await off_loop(prepare, state, request)
    request_id = new_request_id("chatcmpl", request.request_id)
    iterator = state.engine.generate(prompt, None, request_id, request.priority,
                                     request.user, state.lora_for(request.model))

    def shaper() -> ChoiceOutput:
        return ChoiceOutput(state.reasoning_parser, open_at_start, plan.parser)

    if request.stream:
        return _stream(state, request, model, request_id, prompt, iterator, shaper)
    final = await last_output(iterator)
    choices = []
    num_completion_tokens = 0
    for completion in sorted(final.outputs, key=lambda c: c.index):
        num_completion_tokens += len(completion.token_ids)
        message = shaper().message(completion.text)
        choices.append({
            "index": completion.index,
            "message": message,
            "logprobs": _logprobs(state, request, completion),
            "finish_reason": finish_reason(completion.finish_reason, message),
            "stop_reason": completion.stop_reason,
        })
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": usage(len(prompt.token_ids), num_completion_tokens)}


def _logprobs(state: ServerState, request: ChatCompletionRequest,
              completion: CompletionOutput) -> Optional[dict[str, Any]]:
    if not request.logprobs or completion.logprobs is None:
        return None
    return chat_logprobs(state.engine.tokenizer, list(completion.token_ids),
                         list(completion.logprobs), request.top_logprobs or 0)


async def _stream(state: ServerState, request: ChatCompletionRequest, model: str,
                  request_id: str, prompt: ProcessedPrompt,
                  iterator: AsyncIterator[RequestOutput],
                  shaper: Callable[[], ChoiceOutput]) -> AsyncIterator[str]:
    created = int(time.time())
    shapes = [shaper() for _ in range(request.n)]

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": choices, **extra})

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None} for i in range(request.n)])
    num_completion_tokens = 0
    async with contextlib.aclosing(iterator) as it:
        async for output in it:
            choices = []
            for completion in output.outputs:
                num_completion_tokens += len(completion.token_ids)
                shape = shapes[completion.index]
                finished = completion.finished()
                delta = shape.delta(completion.text, finished)
                if not (delta or finished or completion.logprobs):
                    continue  # text held back (partial UTF-8, a stop string, a marker)
                reason = completion.finish_reason
                if reason == "stop" and shape.called_tools:
                    reason = "tool_calls"
                choices.append({
                    "index": completion.index, "delta": delta,
                    "logprobs": _logprobs(state, request, completion),
                    "finish_reason": reason,
                    "stop_reason": completion.stop_reason,
                })
            if choices:
                yield chunk(choices)
    if request.include_usage:
        yield chunk([], usage=usage(len(prompt.token_ids), num_completion_tokens))
    yield SSE_DONE
