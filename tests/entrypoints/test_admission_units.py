"""The admission checks offline: SamplingParams, InputProcessor and chat messages raise
ValueError naming the field, the value and the limit."""

from __future__ import annotations

import math

import pytest

from engine.inputs import InputProcessor, template_message
from engine.sampling_params import SamplingParams


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
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


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
    with pytest.raises(ValueError, match=rf"{field} token id .* 100 tokens"):
        processor.process([1, 2], params)
    with pytest.raises(ValueError, match="Prompt token id 100"):
        processor.process([1, 100], SamplingParams())
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
