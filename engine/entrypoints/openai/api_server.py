"""The FastAPI app of `engine serve`: OpenAI routes, auth, errors, health and metrics.

Rule: the app holds no engine logic. Routes parse (pydantic), hand over to the serving
modules, and every exception becomes an OpenAI-shaped error with its status (unknown
routes, bad JSON and bugs included; never a traceback); `/health` and every generation
route answer 503 as soon as the engine core is gone or the server is draining. The
`_Gate` middleware answers 503 / 401 / 413 before a body is read.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import engine
from engine.engine_core.mp_client import EngineDeadError
from engine.entrypoints.openai import responses as r
from engine.entrypoints.openai import serving_chat, serving_completion
from engine.entrypoints.openai.errors import (
    APIError,
    ServerDrainingError,
    error_body,
    first_line,
    new_error_id,
)
from engine.entrypoints.openai.lora_routes import adapter_cards, add_runtime_lora_routes
from engine.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from engine.entrypoints.openai.serving_common import (
    ServerState,
    admission,
    check_prompt_chars,
    message_chars,
    off_loop,
)
from engine.inputs import template_message
from engine.outputs.request_output import RequestFailedError, RequestRefusedError

logger = logging.getLogger(__name__)

# Routes that do no work and change nothing: open even with --api-key (probes, scrapers,
# the API docs). Every other route needs the key.
OPEN_ROUTES = frozenset({"/health", "/ready", "/version", "/metrics",
                         "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Routes that still answer while the server drains (the rest get 503).
# What a route that does work can answer besides 200.
_WORK_ERRORS = (400, 401, 404, 413, 500, 503)
_DRAIN_OPEN_ROUTES = frozenset({"/health", "/ready", "/version", "/metrics"})
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024


def _error(status: int, message: str, param: Optional[str] = None,
           headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status,
                        headers=headers)


def _dead_message(reason: Optional[str]) -> str:
    # The core's reason may carry its traceback (logged already); the client gets one line.
    return f"The engine core is not running: {first_line(reason or 'process exited')}."


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = [err for err in errors if err.get("type") == "json_invalid"]
    if bad_json:
        # pydantic's loc here is a byte offset, not a field: report no param.
        reason = (bad_json[0].get("ctx") or {}).get("error")
        detail = f" ({reason})" if isinstance(reason, str) else ""
        return _error(400, f"The request body is not valid JSON{detail}.")
    problems = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    fields = [p for p in (errors[0].get("loc", ()) if errors else ()) if isinstance(p, str)]
    param = fields[-1] if fields and fields[-1] != "body" else None
    return _error(400, "Invalid request: " + "; ".join(problems), param)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"No route {request.url.path}; see /docs for the routes this server has."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        elif exc.status_code == 400:  # Starlette could not decode the body (bad UTF-8, ...)
            message = "The request body could not be parsed; send UTF-8 JSON."
        else:
            message = first_line(str(exc.detail))
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(UnicodeDecodeError)
    async def _bad_utf8(_: Request, exc: UnicodeDecodeError) -> JSONResponse:
        return _error(400, f"The request body is not valid UTF-8 (byte {exc.start}).")

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, exc: RequestFailedError) -> JSONResponse:
        if isinstance(exc, RequestRefusedError):  # the request's own fault, found later
            return _error(400, first_line(exc.message), exc.param)
        return _error(500, _failed_message(exc))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, first_line(str(exc)))

    @app.exception_handler(ServerDrainingError)
    async def _draining(_: Request, exc: ServerDrainingError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        error_id = new_error_id()
        logger.error("Unhandled error %s on %s %s", error_id, request.method,
                     request.url.path, exc_info=exc)
        return _error(500, f"Internal server error (id {error_id}); the server log has the "
                           "details under that id.")


def _failed_message(exc: RequestFailedError) -> str:
    """The engine's one-line reason (never a traceback: the core logged that)."""
    return (f"The request failed inside the engine: {first_line(exc.message)} Other "
            "requests were not affected; the server log has the details under request "
            f"id {exc.request_id!r}.")


def _stream_error(exc: BaseException) -> Optional[dict[str, Any]]:
    if isinstance(exc, RequestRefusedError):
        return error_body(400, first_line(exc.message), exc.param)
    if isinstance(exc, RequestFailedError):
        return error_body(500, _failed_message(exc))
    if isinstance(exc, EngineDeadError):
        return error_body(503, first_line(str(exc)))
    if isinstance(exc, ServerDrainingError):
        return error_body(503, str(exc))
    if isinstance(exc, APIError):
        return error_body(exc.status, exc.message, exc.param)
    if isinstance(exc, ValueError):
        return error_body(400, str(exc))
    return None


async def _guard_stream(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Errors after the headers went out can only travel as a last SSE event."""
    from engine.entrypoints.openai.streaming import SSE_DONE, sse

    try:
        async for line in lines:
            yield line
    except Exception as exc:
        body = _stream_error(exc)
        if body is None:
            error_id = new_error_id()
            logger.error("Unhandled error %s in a stream", error_id, exc_info=exc)
            body = error_body(500, f"Internal server error (id {error_id}).")
        yield sse(body)
        yield SSE_DONE


def _respond(result: Any) -> Any:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(_guard_stream(result), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work` (a non-streaming generation) in a task cancelled when the client goes
    away, which aborts its engine requests. The body is read already, so the next ASGI
    message is the disconnect (or nothing until the response is sent)."""
    task = asyncio.ensure_future(work)
    left = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                left.set()
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if left.is_set():  # the client left: nobody reads this response
            return Response(status_code=499)
        raise
    finally:
        watcher.cancel()


class _Gate:
    """ASGI middleware run before routing reads a body: 503 while draining, 401 without
    the API key (RFC 7235: scheme case-insensitive, `WWW-Authenticate: Bearer`), 413 when
    Content-Length or the bytes received pass `max_body_bytes`."""

    def __init__(self, app: Any, state: ServerState, api_key: Optional[str],
                 max_body_bytes: int) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _refusal(self, path: str, headers: dict[str, str]) -> Optional[Response]:
        if self.state.draining and path not in _DRAIN_OPEN_ROUTES:
            return _error(503, "The server is shutting down; retry on another replica.")
        if self.api_key is not None and path not in OPEN_ROUTES:
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode()):
                return _error(401, "Missing or wrong API key; send 'Authorization: Bearer "
                                   "<key>' with the key given to --api-key.",
                              headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return _error(413, f"The request body has {length} bytes; the limit is "
                               f"{self.max_body_bytes} (--max-request-body-bytes).")
        return None

    def _limited(self, receive: Any) -> Any:
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # a chunked body, no Content-Length
                    raise APIError(413, f"The request body passed {self.max_body_bytes} "
                                        "bytes (--max-request-body-bytes).")
            return message

        return limited_receive


def build_app(state: ServerState, registry: CollectorRegistry,
              api_key: Optional[str] = None,
              max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
              allow_runtime_lora_updating: bool = False) -> FastAPI:
    app = FastAPI(title="engine OpenAI-compatible server", version=engine.__version__)
    app.state.server = state
    _install_error_handlers(app)
    app.add_middleware(_Gate, state=state, api_key=api_key,
                       max_body_bytes=max_request_body_bytes)

    def alive() -> None:
        if not state.engine.is_alive:
            raise EngineDeadError(_dead_message(state.engine.dead_reason))

    @app.get("/health", response_model=None,
             responses=r.documented(r.HealthResponse, (500, 503)))
    async def health() -> Response:
        """200 while the engine core runs (no API key needed)."""
        if not state.engine.is_alive:
            return _error(503, _dead_message(state.engine.dead_reason))
        return JSONResponse({"status": "ok"})

    @app.get("/ready", response_model=None, responses=r.documented(r.ReadyResponse, (500, 503)))
    async def ready() -> Any:
        """200 once the server takes requests; 503 while starting or draining."""
        alive()
        if not state.ready:
            return _error(503, "The server is starting or stopping.")
        return {"ready": True, "startup_timings": state.engine.startup_timings,
                "engine_core_pid": state.engine.client.pid}

    @app.get("/version", response_model=None, responses=r.documented(r.VersionResponse, (500,)))
    async def version() -> dict[str, str]:
        return {"version": engine.__version__}

    @app.get("/metrics", response_model=None, response_class=Response,
             responses=r.documented(None, (500,), text="Prometheus text exposition format."))
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache", response_model=None,
              responses=r.documented(r.ResetPrefixCacheResponse, (401, 500, 503)))
    async def reset_prefix_cache() -> dict[str, Any]:
        alive()
        return {"reset": bool(await state.engine.reset_prefix_cache())}

    @app.get("/v1/models", response_model=None,
             responses=r.documented(r.ModelList, (401, 500, 503)))
    async def models() -> dict[str, Any]:
        max_len = state.engine.config.model.max_model_len
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "engine",
                 "root": state.model_path, "parent": None, "max_model_len": max_len}
                for name in state.model_names]
        return {"object": "list", "data": data + adapter_cards(state)}

    @app.post("/v1/completions", response_model=None,
              responses=r.documented(r.CompletionResponse, _WORK_ERRORS,
                                   stream_of="CompletionResponse"))
    async def completions(request: CompletionRequest, raw: Request) -> Any:
        alive()
        if request.stream:
            return _respond(await serving_completion.create_completion(state, request))
        return _respond(await _unless_disconnected(
            raw, serving_completion.create_completion(state, request)))

    @app.post("/v1/chat/completions", response_model=None,
              responses=r.documented(r.ChatCompletionResponse, _WORK_ERRORS,
                                   stream_of="ChatCompletionChunk"))
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Any:
        alive()
        if request.stream:
            return _respond(await serving_chat.create_chat_completion(state, request))
        return _respond(await _unless_disconnected(
            raw, serving_chat.create_chat_completion(state, request)))

    @app.post("/tokenize", response_model=None,
              responses=r.documented(r.TokenizeResponse, _WORK_ERRORS))
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        state.check_model(request.model)
        if request.messages is not None:
            check_prompt_chars(state, message_chars(request.messages), "messages")
        elif request.prompt is not None:
            check_prompt_chars(state, len(request.prompt), "prompt")
        else:
            raise APIError(400, "Pass either 'prompt' or 'messages'.", param="prompt")
        tokens = await off_loop(_tokenize, state, request)
        return {"tokens": tokens, "count": len(tokens),
                "max_model_len": state.engine.config.model.max_model_len}

    @app.post("/detokenize", response_model=None,
              responses=r.documented(r.DetokenizeResponse, _WORK_ERRORS))
    async def detokenize(request: DetokenizeRequest) -> dict[str, str]:
        state.check_model(request.model)
        vocab = state.engine.config.model.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"Token ids {bad[:5]} are outside the vocabulary [0, {vocab}).",
                           param="tokens")
        return {"prompt": state.engine.tokenizer.decode(request.tokens)}

    if allow_runtime_lora_updating:
        add_runtime_lora_routes(app, state)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = r.complete_schema(get_openapi(
                title=app.title, version=app.version, routes=app.routes),
                guarded=None if api_key is None else OPEN_ROUTES)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _tokenize(state: ServerState, request: TokenizeRequest) -> list[int]:
    """The prompt's tokens, or the templated messages' (checked as a chat request's are)."""
    tokenizer = state.engine.tokenizer
    with admission(request):
        if request.messages is not None:
            text = state.engine.input_processor.apply_chat_template(
                [template_message(m.model_dump(exclude_none=True), i)
                 for i, m in enumerate(request.messages)],
                add_generation_prompt=request.add_generation_prompt)
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
