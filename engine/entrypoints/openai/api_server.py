"""The FastAPI app of `engine serve`: OpenAI routes, auth, errors, health and metrics.

Rule: the app holds no engine logic. Routes parse (pydantic), hand over to the serving
modules, and every exception becomes an OpenAI-shaped error with its status; `/health`
and every generation route answer 503 as soon as the engine core is gone.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import engine
from engine.engine_core.mp_client import EngineDeadError
from engine.entrypoints.openai import serving_chat, serving_completion
from engine.entrypoints.openai.errors import APIError, error_body
from engine.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from engine.entrypoints.openai.serving_common import ServerState

logger = logging.getLogger(__name__)


def _error(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = str(first[-1]) if first else None
        return _error(400, "Invalid request: " + "; ".join(problems), param)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error")
        return _error(500, f"Internal error: {type(exc).__name__}: {exc}")


async def _guard_stream(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Errors after the headers went out can only travel as a last SSE event."""
    from engine.entrypoints.openai.streaming import SSE_DONE, sse

    try:
        async for line in lines:
            yield line
    except EngineDeadError as exc:
        yield sse(error_body(503, str(exc)))
        yield SSE_DONE
    except ValueError as exc:
        yield sse(error_body(400, str(exc)))
        yield SSE_DONE


def _respond(result: Any) -> Any:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(_guard_stream(result), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def build_app(state: ServerState, registry: CollectorRegistry,
              api_key: Optional[str] = None) -> FastAPI:
    app = FastAPI(title="engine OpenAI-compatible server", version=engine.__version__)
    app.state.server = state
    _install_error_handlers(app)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "Missing or wrong API key; send 'Authorization: Bearer "
                                   "<key>' with the key given to --api-key.")
        return await call_next(request)

    def alive() -> None:
        if not state.engine.is_alive:
            raise EngineDeadError(f"The engine core is not running: {state.engine.dead_reason}.")

    @app.get("/health")
    async def health() -> Response:
        if not state.engine.is_alive:
            return _error(503, f"The engine core is not running: {state.engine.dead_reason}.")
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> Any:
        alive()
        if not state.ready:
            return _error(503, "The server is starting or stopping.")
        return {"ready": True, "startup_timings": state.engine.startup_timings,
                "engine_core_pid": state.engine.client.pid}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": engine.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, Any]:
        alive()
        return {"reset": bool(await state.engine.reset_prefix_cache())}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        max_len = state.engine.config.model.max_model_len
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "engine",
                 "root": state.model_path, "max_model_len": max_len}
                for name in state.model_names]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        alive()
        return _respond(await serving_completion.create_completion(state, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest) -> Any:
        alive()
        return _respond(await serving_chat.create_chat_completion(state, request))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        state.check_model(request.model)
        tokenizer = state.engine.tokenizer
        if request.messages is not None:
            text = state.engine.input_processor.apply_chat_template(
                [m.as_template_dict() for m in request.messages],
                add_generation_prompt=request.add_generation_prompt)
            tokens = tokenizer.encode(text, add_special_tokens=False)
        elif request.prompt is not None:
            tokens = tokenizer.encode(request.prompt,
                                      add_special_tokens=request.add_special_tokens)
        else:
            raise APIError(400, "Pass either 'prompt' or 'messages'.", param="prompt")
        return {"tokens": tokens, "count": len(tokens),
                "max_model_len": state.engine.config.model.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, str]:
        state.check_model(request.model)
        vocab = state.engine.config.model.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"Token ids {bad[:5]} are outside the vocabulary [0, {vocab}).",
                           param="tokens")
        return {"prompt": state.engine.tokenizer.decode(request.tokens)}

    return app
