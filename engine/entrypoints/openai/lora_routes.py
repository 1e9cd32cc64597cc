"""`/v1/models` entries of the LoRA adapters, and the runtime routes that load and unload
them (vLLM's `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`).

Rule: the runtime routes exist only with --allow-runtime-lora-updating (or vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING=1): without it they are 404s like any unknown route. They
sit behind --api-key like every route that changes state. Loading checks the directory
without reading weights (`LoRARegistry.add`: a 400 with the reason); unloading takes the
name away from new requests while the requests already running with it finish, as vLLM does.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from engine.entrypoints.openai import responses as r
from engine.entrypoints.openai.errors import APIError
from engine.entrypoints.openai.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from engine.entrypoints.openai.serving_common import ServerState

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_updating_from_env() -> bool:
    return os.environ.get(RUNTIME_UPDATING_ENV, "").strip().lower() in ("1", "true", "yes")


def adapter_cards(state: ServerState) -> list[dict[str, Any]]:
    """One `/v1/models` entry per adapter: `parent` its base model, `root` its directory."""
    if state.loras is None:
        return []
    max_len = state.engine.config.model.max_model_len
    return [{"id": lora.lora_name, "object": "model", "created": state.created,
             "owned_by": "engine", "root": lora.lora_path, "parent": parent,
             "max_model_len": max_len}
            for lora, parent in state.loras.entries()]


def add_runtime_lora_routes(app: FastAPI, state: ServerState) -> None:
    errors = (400, 401, 404, 500, 503)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
              responses=r.documented(None, errors, text="Success: the adapter is served."))
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> PlainTextResponse:
        """Serve the peft adapter at `lora_path` as model `lora_name` (400 with the reason
        when it cannot be: the name taken, no adapter_config.json, rank above
        --max-lora-rank, a target the model lacks, ...)."""
        loras = _registry(state)
        try:
            loras.add(request.lora_name, request.lora_path, reserved=state.model_names)
        except ValueError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        return PlainTextResponse(
            f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses=r.documented(None, errors, text="Success: the adapter is gone."))
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        """Stop serving `lora_name` to new requests; requests already running with it
        finish with it."""
        loras = _registry(state)
        try:
            loras.remove(request.lora_name)
        except KeyError:
            raise APIError(404, f"The LoRA adapter `{request.lora_name}` is not loaded; "
                                f"loaded: {loras.names()}.", param="lora_name") from None
        return PlainTextResponse(
            f"Success: LoRA adapter '{request.lora_name}' removed successfully.")


def _registry(state: ServerState) -> Any:
    if state.loras is None:  # the server refuses the flag without --enable-lora
        raise APIError(400, "LoRA is off; start the server with --enable-lora.")
    return state.loras
