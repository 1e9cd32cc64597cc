"""Input processing on the client side: prompt -> validated token ids and sampling params.

Rule: every request is checked here, before it reaches the engine core, and a bad one is
refused with a ValueError that names the value, the limit and the parameter or flag to change.
The engine core trusts what it receives.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from engine.sampling_params import InvalidParameter, SamplingParams

# generation_config.json keys that map onto SamplingParams fields (HF name -> our name).
_GENERATION_DEFAULT_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_new_tokens": "max_tokens",
    "max_tokens": "max_tokens",
}


class InputProcessor:
    """Tokenizes and validates prompts; owns the chat template and the generation defaults."""

    def __init__(
        self,
        tokenizer: Any,
        max_model_len: int,
        max_logprobs: int,
        generation_defaults: Optional[dict[str, Any]] = None,
        chat_template: Optional[str] = None,
        *,
        vocab_size: Optional[int] = None,
        structured_outputs_backend: str = "auto",
    ) -> None:
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._max_logprobs = max_logprobs
        self._generation_defaults = dict(generation_defaults or {})
        self._chat_template = _load_chat_template(chat_template)
        # The model may pad its embedding table past the tokenizer; either bound is a valid id.
        self._vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
        self._structured_outputs_backend = structured_outputs_backend

    def process(
        self, prompt: Union[str, list[int]], params: SamplingParams
    ) -> tuple[Optional[str], list[int], SamplingParams]:
        """(prompt text or None, prompt token ids, params with max_tokens filled in)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameter("prompt", "The prompt is empty; pass a prompt with at least one token.")
            prompt_text: Optional[str] = prompt
            token_ids = list(self._tokenizer.encode(prompt))
        else:
            prompt_text = None
            token_ids = list(prompt)
            self._check_token_ids(token_ids)
        if not token_ids:
            raise InvalidParameter("prompt", "The prompt has 0 tokens; pass a prompt with at least one token.")
        return prompt_text, token_ids, self._check_params(len(token_ids), params)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults applied.

        For callers that did not set the params themselves (`LLM.generate(params=None)`, the
        server for request fields left unset): SamplingParams cannot tell "unset" from
        "set to the default", so defaults are never merged into user-given params.
        """
        fields = {
            ours: self._generation_defaults[hf]
            for hf, ours in _GENERATION_DEFAULT_FIELDS.items()
            if self._generation_defaults.get(hf) is not None
        }
        return SamplingParams(**fields)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        continue_final_message: bool = False,
        tools: Optional[list[dict[str, Any]]] = None,
    ) -> str:
        """The conversation rendered as one prompt string, by the override or model template
        (`tools`: OpenAI tool definitions, handed to the template as `tools`)."""
        template = self._chat_template or getattr(self._tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                "The model's tokenizer has no chat template; pass one with --chat-template "
                "(a file path or the template text)."
            )
        if add_generation_prompt and continue_final_message:
            raise InvalidParameter(
                "continue_final_message",
                "add_generation_prompt and continue_final_message are both true; set "
                "add_generation_prompt=false to continue the final message."
            )
        rendered = self._tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **({"tools": tools} if tools else {}),
            **(chat_template_kwargs or {}),
        )
        return rendered

    def _check_token_ids(self, token_ids: list[int]) -> None:
        for position, token_id in enumerate(token_ids):
            if not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
                raise InvalidParameter(
                    "prompt", f"Prompt token id {token_id!r} at position {position} is out of range: the "
                    f"vocabulary has {self._vocab_size} tokens (ids 0..{self._vocab_size - 1}); "
                    "pass token ids from the model's tokenizer."
                )

    def _check_param_token_ids(self, params: SamplingParams) -> None:
        """Token ids inside the sampling params (the worker re-checks them as a backstop)."""
        named = [("stop_token_ids", list(params.stop_token_ids or ())),
                 ("logit_bias", list(params.logit_bias or ()))]
        for name, ids in named:
            for token_id in ids:
                if not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
                    raise InvalidParameter(
                        name, f"{name} token id {token_id!r} is out of range: the vocabulary has "
                        f"{self._vocab_size} tokens (ids 0..{self._vocab_size - 1}); pass token "
                        "ids from the model's tokenizer."
                    )

    def _check_params(self, num_prompt_tokens: int, params: SamplingParams) -> SamplingParams:
        limit = self._max_model_len
        if num_prompt_tokens >= limit:
            raise InvalidParameter(
                "prompt", f"The prompt has {num_prompt_tokens} tokens but max_model_len is {limit} (the "
                "prompt must leave room for at least one output token); pass a shorter prompt "
                "or raise --max-model-len."
            )
        if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > limit:
            raise InvalidParameter(
                "max_tokens", f"The prompt has {num_prompt_tokens} tokens and max_tokens is "
                f"{params.max_tokens}: {num_prompt_tokens + params.max_tokens} tokens exceed "
                f"max_model_len {limit}; lower max_tokens to at most "
                f"{limit - num_prompt_tokens} or raise --max-model-len."
            )
        self._check_param_token_ids(params)
        if params.structured_outputs is not None:
            from engine.structured_outputs.backend import GrammarError
            from engine.structured_outputs.manager import check_structured_outputs

            try:
                check_structured_outputs(params.structured_outputs,
                                         self._structured_outputs_backend)
            except GrammarError as exc:
                raise InvalidParameter(
                    "structured_outputs", f"structured_outputs.{params.structured_outputs.kind}"
                    f" does not compile: {exc}") from None
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self._max_logprobs:
                raise InvalidParameter(
                    name, f"{name} is {value} but the engine allows at most {self._max_logprobs} "
                    f"(--max-logprobs); request at most {self._max_logprobs} or restart with "
                    f"--max-logprobs {value}."
                )
        if params.stop and not params.detokenize:
            raise InvalidParameter(
                "stop", f"stop strings {params.stop!r} need detokenize=True (stop strings are found in "
                "the text); set detokenize=True or use stop_token_ids."
            )
        if params.max_tokens is None:
            return params.clone(max_tokens=limit - num_prompt_tokens)
        return params


def _load_chat_template(chat_template: Optional[str]) -> Optional[str]:
    """`--chat-template` is a file path or the template text itself."""
    if chat_template is None:
        return None
    if "{" not in chat_template and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    if "{" not in chat_template:
        raise ValueError(
            f"--chat-template {chat_template!r} is neither a file nor a Jinja template (no "
            "'{' in it); pass an existing file path or the template text."
        )
    return chat_template


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def template_message(message: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """One OpenAI chat message as the chat template expects it: a known role and string
    content (a list of content parts is joined from its text parts). Shared by `LLM.chat`
    and the server, so both refuse the same messages."""
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise InvalidParameter(
            "messages", f"messages[{index}].role is {role!r}; it must be one of {CHAT_ROLES}.")
    content = message.get("content")
    if content is None:
        # OpenAI allows an assistant message without content (it carries tool calls).
        if role != "assistant":
            raise InvalidParameter(
                "messages", f"messages[{index}].content is missing; a {role} message needs "
                "content (a string or a list of content parts).")
        content = ""
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidParameter(
                    "messages", f"messages[{index}].content[{j}] has type {kind!r}; this text-only model "
                    "takes content parts of type 'text' with a string 'text' field.")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise InvalidParameter(
            "messages", f"messages[{index}].content must be a string or a list of content "
            f"parts, got {type(content).__name__}.")
    out = {k: v for k, v in message.items() if k not in ("role", "content")}
    if role == "assistant" and out.get("tool_calls"):
        out["tool_calls"] = _template_tool_calls(out["tool_calls"], index)
    return {"role": role, "content": content, **out}


def _template_tool_calls(tool_calls: list[Any], index: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as chat templates expect them: the arguments as
    an object (the API carries them as JSON text)."""
    out = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidParameter("messages", f"messages[{index}].tool_calls[{j}] needs "
                                   "function.name and function.arguments.")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as exc:
                raise InvalidParameter(
                    "messages", f"messages[{index}].tool_calls[{j}].function.arguments is not "
                    f"JSON: {exc}.") from None
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out

