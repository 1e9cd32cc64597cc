"""The admission checks offline: SamplingParams, InputProcessor and chat messages raise
ValueError naming the field, the value and the limit; an InvalidParameter carries the field,
which the server's 400 names as `param`."""

from __future__ import annotations

import math

import pytest

from engine.entrypoints.openai.errors import APIError
from engine.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from engine.entrypoints.openai.serving_common import admission
from engine.inputs import InputProcessor, template_message
from engine.sampling_params import InvalidParameter, SamplingParams


class _Tok:
    def __len__(self) -> int:
        return 100

    def encode(self, text: str) -> list[int]:
        return [1, 2]


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", 1e308),
    ("top_p", math.nan), ("min_p", math.inf), ("presence_penalty", math.nan),
    ("frequency_penalty", -math.inf), ("repetition_penalty", math.nan),
])
def test_non_finite_or_huge_floats_are_refused(field, value):
    with pytest.raises(InvalidParameter, match=field) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


@pytest.mark.parametrize("bias", [100.5, -1e308, math.nan])
def test_logit_bias_values_are_bounded(bias):
    with pytest.raises(ValueError, match=r"logit_bias .*\[-100, 100\]"):
        SamplingParams(logit_bias={1: bias})
    SamplingParams(logit_bias={1: 100.0, 2: -100.0})


@pytest.mark.parametrize("params,field", [
    (SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    (SamplingParams(stop_token_ids=[100]), "stop_token_ids"),
    (SamplingParams(logit_bias={100: 1.0}), "logit_bias"),
])
def test_token_ids_in_params_are_checked_against_the_vocabulary(params, field):
    processor = InputProcessor(_Tok(), max_model_len=64, max_logprobs=5, vocab_size=100)
    with pytest.raises(InvalidParameter, match=rf"{field} token id .* 100 tokens") as err:
        processor.process([1, 2], params)
    assert err.value.param == field
    with pytest.raises(InvalidParameter, match="Prompt token id 100") as err:
        processor.process([1, 100], SamplingParams())
    assert err.value.param == "prompt"
    processor.process([1, 99], SamplingParams(stop_token_ids=[99], logit_bias={0: 1.0}))


def test_chat_messages_roles_and_content():
    with pytest.raises(ValueError, match=r"messages\[2\].role is 'wizard'"):
        template_message({"role": "wizard", "content": "x"}, 2)
    with pytest.raises(ValueError, match="content is missing"):
        template_message({"role": "user"})
    with pytest.raises(ValueError, match="type 'image_url'"):
        template_message({"role": "user", "content": [{"type": "image_url"}]})
    assert template_message({"role": "assistant"})["content"] == ""
    joined = template_message({"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]})
    assert joined == {"role": "user", "content": "a\nb"}


def _refusal(request, error: Exception) -> APIError:
    with pytest.raises(APIError) as caught, admission(request):
        raise error
    return caught.value


def test_admission_names_the_field_the_error_carries():
    completion = CompletionRequest(model="m", prompt="hi")
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    too_long = InvalidParameter("prompt", "The prompt has 99 tokens but max_model_len is 64")
    assert _refusal(completion, too_long).param == "prompt"
    assert _refusal(chat, too_long).param == "messages"  # a chat request's prompt
    # The field comes from the error, not from the words its message starts with.
    assert _refusal(chat, InvalidParameter("top_p", "must be in (0, 1]")).param == "top_p"
    plain = _refusal(chat, ValueError("temperature words first, but no field"))
    assert plain.status == 400 and plain.param is None
