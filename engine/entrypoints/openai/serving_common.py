"""What both generation endpoints share: server state, model-name check, sampling setup.

Rule: all input checks happen before a request reaches the engine or a stream starts, so
a bad request gets its 400 as a normal response, never half-way through an SSE stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from engine.engine_core.async_llm import AsyncLLM
from engine.entrypoints.lora_adapters import LoRARegistry
from engine.entrypoints.openai.errors import APIError
from engine.entrypoints.openai.unsupported import refuse_unsupported
from engine.messages.core import LoRARequest
from engine.outputs.request_output import PositionLogprobs
from engine.sampling_params import InvalidParameter


@dataclass
class ServerState:
    engine: AsyncLLM
    model_names: list[str]
    model_path: str
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = True
    # Set on SIGTERM/SIGINT: new work gets 503 while requests in flight finish or time out.
    draining: bool = False
    # --tool-call-parser (None: tool_choice="auto" is refused) and --reasoning-parser.
    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[Any] = None
    # LoRA adapters served by name (--enable-lora); None: LoRA off.
    loras: Optional[LoRARegistry] = None

    @property
    def default_model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: Optional[str]) -> str:
        """The served name to report; 404 for a name this server does not serve."""
        if name is None or name in self.model_names:
            return name or self.default_model_name
        if self.loras is not None and name in self.loras:
            return name
        served = self.model_names + (self.loras.names() if self.loras is not None else [])
        raise APIError(404, f"The model `{name}` does not exist; this server serves "
                            f"{served}.", param="model")

    def lora_for(self, name: Optional[str]) -> Optional[LoRARequest]:
        """The adapter a request's `model` names; None for the base model."""
        return None if self.loras is None else self.loras.get(name)


# A token of a real tokenizer is rarely longer than a few characters; a prompt with more
# than this many characters per max_model_len token cannot fit, so it is refused before
# the tokenizer spends seconds (holding the GIL) on megabytes of text.
MAX_CHARS_PER_TOKEN = 32

# Tokenization and chat templating run here, off the event loop, so /health and streams
# keep answering while a big prompt is tokenized.
_TOKENIZER_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tokenize")

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the tokenizer thread pool; its exceptions propagate."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_POOL, fn, *args)


def check_prompt_chars(state: ServerState, num_chars: int, param: str) -> None:
    """400 before tokenizing when the text cannot fit in max_model_len tokens."""
    max_model_len = state.engine.config.model.max_model_len
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if num_chars > limit:
        raise APIError(400, f"'{param}' has {num_chars} characters; a prompt of more than "
                            f"{limit} characters cannot fit in max_model_len={max_model_len} "
                            "tokens (raise --max-model-len to serve longer prompts).",
                       param=param)


def message_chars(messages: list[Any]) -> int:
    """Characters of the text in chat messages (strings or lists of text parts)."""
    total = 0
    for message in messages:
        content = getattr(message, "content", None)
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def request_fields(request: Any) -> dict[str, Any]:
    """Every field the client sent, declared or extra (for the unsupported-field table)."""
    fields = {name: getattr(request, name) for name in request.model_fields_set}
    fields.update(request.model_extra or {})
    return fields


@contextmanager
def admission(request: Any) -> Iterator[None]:
    """Refuse unsupported fields, and turn the input checks' errors into 400s: an
    InvalidParameter names its field as `param` (a chat request's prompt is its
    `messages`); any other ValueError has no field to name."""
    refuse_unsupported(request_fields(request))
    try:
        yield
    except InvalidParameter as exc:
        param = exc.param
        if param == "prompt" and not hasattr(request, "prompt"):
            param = "messages"
        raise APIError(400, str(exc), param=param) from None
    except ValueError as exc:
        raise APIError(400, str(exc), param=None) from None


def new_request_id(prefix: str, given: Optional[str]) -> str:
    return given if given else f"{prefix}-{uuid.uuid4().hex}"


def token_text(tokenizer: Any, token_id: int, position: Optional[PositionLogprobs]) -> str:
    """The text of one token, from the logprobs entry when it has it (decoded already)."""
    if position is not None:
        entry = position.get(token_id)
        if entry is not None and entry.decoded_token is not None:
            return entry.decoded_token
    return tokenizer.decode([token_id])


def top_entries(tokenizer: Any, position: PositionLogprobs) -> list[tuple[str, float]]:
    """(token text, logprob) of a position's entries, best first."""
    items = sorted(position.items(), key=lambda kv: kv[1].logprob, reverse=True)
    return [(token_text(tokenizer, tid, position), lp.logprob) for tid, lp in items]


def completion_logprobs(tokenizer: Any, token_ids: list[int],
                        positions: list[Optional[PositionLogprobs]],
                        text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object; a `None` position gives null entries
    (the first prompt token when echoing)."""
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    offsets: list[int] = []
    for token_id, position in zip(token_ids, positions, strict=False):
        text = token_text(tokenizer, token_id, position)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if position is None or token_id not in position:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(position[token_id].logprob)
        top_logprobs.append(dict(top_entries(tokenizer, position)))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Any, token_ids: list[int], positions: list[PositionLogprobs],
                  top_k: int) -> dict[str, Any]:
    """The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    content = []
    for token_id, position in zip(token_ids, positions, strict=False):
        text = token_text(tokenizer, token_id, position)
        top = top_entries(tokenizer, position)[:top_k]
        content.append({
            "token": text, "logprob": position[token_id].logprob,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                             for t, lp in top],
        })
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
