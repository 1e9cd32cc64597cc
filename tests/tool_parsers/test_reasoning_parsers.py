"""Reasoning parsers on fixed outputs, whole and streamed a character at a time."""

from __future__ import annotations

import pytest

from engine.reasoning import ReasoningStreamer, get_reasoning_parser, reasoning_parser_names

# (parser, prompt, output, reasoning, content)
CASES = [
    ("deepseek_r1", "<｜User｜>hi<｜Assistant｜><think>\n", "Let me think.\n</think>\n\nHello!",
     "Let me think.\n", "Hello!"),
    ("deepseek_r1", "<｜Assistant｜>", "<think>Hmm</think>Hi", "Hmm", "Hi"),
    ("deepseek_r1", "x", "still thinking, cut off by max_tokens",
     "still thinking, cut off by max_tokens", ""),
    ("qwen3", "<|im_start|>assistant\n", "<think>\nA < B?\n</think>\n\n42", "\nA < B?\n", "42"),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "Just the answer <t>",
     "", "Just the answer <t>"),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "open in the prompt</think>done",
     "open in the prompt", "done"),
    ("qwen3", "<|im_start|>assistant\n", "no think block", "", "no think block"),
]


@pytest.mark.parametrize("name,prompt,text,reasoning,content", CASES)
def test_whole_and_streamed(name, prompt, text, reasoning, content):
    parser = get_reasoning_parser(name)
    open_at_start = parser.opens_reasoning(prompt)
    assert parser.parse(text, True, open_at_start) == (reasoning, content)
    streamer = ReasoningStreamer(parser, open_at_start)
    got = ["", ""]
    for i, ch in enumerate(list(text) + [""]):
        r, c = streamer.feed(ch, final=i == len(text))
        got[0] += r
        got[1] += c
        assert "</think" not in got[0] and "<think" not in got[0]
    assert tuple(got) == (reasoning, content)


def test_registry():
    assert {"deepseek_r1", "qwen3"} <= set(reasoning_parser_names())
    with pytest.raises(ValueError, match="deepseek_r1"):
        get_reasoning_parser("nope")
