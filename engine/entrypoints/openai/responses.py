"""What each route answers, as pydantic models: the OpenAPI document, not a runtime check.

Rule: handlers build plain dicts (no validation cost on the hot path); these models describe
them, and `nox -s schemathesis` holds the two together by checking every response of a live
server against the document. Every route documents its errors with `ErrorResponse` under the
statuses it can really answer (400 bad input, 401 without the key, 404 unknown model, 413
body too large, 500 a bug or one failed request, 503 engine dead or draining), never
FastAPI's 422, which this server does not send.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

from engine.entrypoints.openai.protocol import ErrorResponse

FinishReason = Optional[Literal["stop", "length", "tool_calls", "abort", "error"]]
StopReason = Optional[Union[int, str]]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs; entries are null where there is none (the first
    prompt token when echoing)."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None
    stop_reason: StopReason = None


class CompletionResponse(BaseModel):
    """Also each `data:` event of a stream (`choices` hold the new text; the last event
    before `[DONE]` carries `usage` when `stream_options.include_usage`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="A JSON object, as text.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessageOut(BaseModel):
    """`content` is null when the answer is only tool calls; `reasoning_content` is there
    with --reasoning-parser."""

    role: Literal["assistant"]
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ToolCallOut]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None
    stop_reason: StopReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(BaseModel):
    """A call's first delta has its id, type and name; later ones add to its arguments."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None
    stop_reason: StopReason = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a chat stream."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    # A LoRA adapter's base model id (vLLM's shape); None for the base model itself.
    parent: Optional[str] = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    ready: bool
    startup_timings: dict[str, float] = Field(description="Seconds per startup stage.")
    engine_core_pid: Optional[int] = None


class VersionResponse(BaseModel):
    version: str


class ResetPrefixCacheResponse(BaseModel):
    reset: bool


_ERROR_TEXT = {
    400: "Invalid input: the message names the field, the value and the limit.",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`, see --api-key).",
    404: "Unknown model (see /v1/models).",
    413: "The request body is larger than --max-request-body-bytes.",
    500: "A bug, or this request failed inside the engine (others were not affected); "
         "the server log has the details under the id in the message.",
    503: "The engine core is not running, or the server is shutting down.",
}

_SSE = "Server-sent events (`stream: true`): each `data:` line holds one JSON {name}, " \
       "then `data: [DONE]`. An error after the stream started is a last `data:` event " \
       "holding an ErrorResponse, then `data: [DONE]`."


def _event_schema(name: str) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 without itemSchema: `schema` is each event):
    its data is `[DONE]` or JSON holding a `name` chunk or an ErrorResponse."""
    chunk = {"anyOf": [{"$ref": f"#/components/schemas/{name}"},
                       {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json",
                       "contentSchema": chunk}]}
    return {"type": "object", "required": ["data"], "description": _SSE.format(name=name),
            "properties": {"data": data, "event": {"type": "string"},
                           "id": {"type": "string"}, "retry": {"type": "integer"}}}


def documented(model: Optional[type[BaseModel]], errors: tuple[int, ...],
               stream_of: Optional[str] = None, text: Optional[str] = None
               ) -> dict[Union[int, str], dict[str, Any]]:
    """The `responses=` of one route: 200 as `model` (and as SSE events of `stream_of`, or
    as plain text described by `text`), and each status in `errors` as ErrorResponse."""
    ok: dict[str, Any] = {"description": "Success."}
    if model is not None:
        ok["model"] = model
    if stream_of is not None:
        ok["content"] = {"text/event-stream": {"schema": _event_schema(stream_of)}}
    if text is not None:
        ok["content"] = {"text/plain": {"schema": {"type": "string", "description": text}}}
    responses: dict[Union[int, str], dict[str, Any]] = {200: ok}
    for status in errors:
        responses[status] = {"model": ErrorResponse, "description": _ERROR_TEXT[status]}
    return responses


def complete_schema(schema: dict[str, Any],
                    guarded: Optional[frozenset[str]] = None) -> dict[str, Any]:
    """FastAPI's document, made true: its automatic 422 responses go (the server answers
    400 for invalid bodies, in the OpenAI shape) with the validation-error schemas nothing
    refers to after that, and the chat stream's chunk model joins the components. With an
    API key (`guarded`: the paths left open), every other operation requires bearer auth
    and lists 401; without one, nothing answers 401 and no operation says it may."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            if guarded is None or path in guarded:
                responses.pop("401", None)
            else:
                operation["security"] = [{"bearer": []}]
    if guarded is not None:
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "The key given to --api-key."}}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(chunk.pop("$defs", {}))
    components["ChatCompletionChunk"] = chunk
    return schema
