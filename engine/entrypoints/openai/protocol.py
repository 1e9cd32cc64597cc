"""Pydantic models of the OpenAI API requests the server accepts, plus the engine's extras.

Rule: requests are validated here (strict JSON types, ranges the OpenAI API defines); fields a client
sends that we do not know are ignored with one logged warning, never rejected, so existing
clients keep working. Anything left `None` takes the model's default sampling parameters.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.inputs import CHAT_ROLES
from engine.sampling_params import (
    InvalidParameter,
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
)

logger = logging.getLogger(__name__)

# Every integer the server accepts fits the engine's wire format (msgpack, 64 bits); larger
# ones are a 400 naming the field, not an overflow deep inside.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class OpenAIBaseModel(BaseModel):
    # strict: JSON types as the schema says (true is not 1, "5" is not 5), so the OpenAPI
    # document is what the server accepts.
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _warn_unknown_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            logger.warning("%s: ignoring unknown fields %s", type(self).__name__,
                           sorted(self.model_extra))
        return self


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[int, str]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class JsonSchemaFormat(OpenAIBaseModel):
    name: str = "schema"
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingRequest(OpenAIBaseModel):
    """Fields shared by completions and chat completions."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=128)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[Int64] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # engine extras
    top_k: Optional[Int64] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Int64 = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[Int64]] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: Optional[Int64] = None
    priority: Int64 = 0
    request_id: Optional[str] = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_*
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def to_sampling_params(self, defaults: SamplingParams, max_tokens: Optional[int],
                           logprobs: Optional[int], echo_logprobs: bool) -> SamplingParams:
        """SamplingParams for this request; unset fields take `defaults` (generation config)."""

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return getattr(defaults, name) if value is None else value

        prompt_logprobs = self.prompt_logprobs
        if echo_logprobs and prompt_logprobs is None:
            prompt_logprobs = logprobs or 0
        return SamplingParams(
            n=self.n, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
            min_p=pick("min_p"), seed=self.seed, presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            repetition_penalty=pick("repetition_penalty"),
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(self.logit_bias),
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=self.structured_outputs_params(),
        )

    def structured_outputs_params(self) -> Optional[StructuredOutputsParams]:
        """The one output constraint the request names, if any (more than one is a 400)."""
        given: list[tuple[str, StructuredOutputsParams]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
            if schema is None:
                raise InvalidParameter("response_format", "response_format of type "
                                       "json_schema needs json_schema.schema.")
            given.append(("response_format", StructuredOutputsParams(json=schema)))
        if self.structured_outputs is not None:
            try:
                given.append(("structured_outputs",
                              StructuredOutputsParams(**self.structured_outputs)))
            except TypeError as exc:
                raise InvalidParameter("structured_outputs", f"structured_outputs: {exc}; it "
                                       "takes json, regex, choice, grammar or json_object.") \
                    from None
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                           ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                given.append((name, StructuredOutputsParams(**{kind: value})))
        if len(given) > 1:
            raise InvalidParameter(given[1][0], "a request takes one output constraint; got "
                                   + ", ".join(name for name, _ in given) + ".")
        return given[0][1] if given else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[Int64], list[list[Int64]]]
    max_tokens: Optional[Int64] = 16
    echo: bool = False
    logprobs: Optional[Int64] = Field(None, ge=0)
    suffix: Optional[str] = None

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt field as a list of prompts (strings or token-id lists)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidParameter("prompt",
                                   "prompt is empty; pass a non-empty string or list of token ids.")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)


class ChatMessage(OpenAIBaseModel):
    # Checked at admission (a 400 naming messages[i].role); the enum is for the document.
    role: str = Field(json_schema_extra={"enum": list(CHAT_ROLES)})
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    # An assistant turn's calls ({id, type, function: {name, arguments: JSON text}}), and
    # the call a tool message answers.
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[Int64] = None
    max_completion_tokens: Optional[Int64] = None
    logprobs: bool = False
    top_logprobs: Optional[Int64] = Field(None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None

    @property
    def effective_max_tokens(self) -> Optional[int]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    """`POST /v1/load_lora_adapter` (vLLM's names)."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    """`POST /v1/unload_lora_adapter` (vLLM's names; lora_int_id is accepted and unused)."""

    lora_name: str
    lora_int_id: Optional[int] = None


class TokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[Int64]


def _logit_bias(bias: Optional[dict[str, float]]) -> Optional[dict[int, float]]:
    if bias is None:
        return None
    try:
        return {int(token): float(value) for token, value in bias.items()}
    except ValueError:
        raise InvalidParameter(
            "logit_bias", f"logit_bias keys must be token ids (integers as strings), got {list(bias)[:5]}."
        ) from None
