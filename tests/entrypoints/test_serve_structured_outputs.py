"""Structured outputs through a live server and the official openai SDK: response_format
json_schema (streaming and not) and json_object, vLLM's structured_outputs / guided_* in the
extra body, and 400s for invalid or conflicting constraints."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from serve_fixtures import start_server

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "score": {"type": "number", "minimum": 0, "maximum": 10}},
    "required": ["name", "tags", "score"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Describe a user as JSON."}]


@pytest.fixture(scope="module")
def client():
    server = start_server("--served-model-name", "m", "--max-model-len", "512",
                          "--kv-cache-memory", "256m")
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                        timeout=120)
    server.stop()


def _fmt(strict: bool) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA,
                                                   "strict": strict}}


@pytest.mark.parametrize("strict", [True, False])
def test_response_format_json_schema_gives_valid_json(client, strict):
    out = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=120,
                                         temperature=0, response_format=_fmt(strict))
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_streamed_json_schema_output_joins_into_valid_json(client):
    stream = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=120,
                                            temperature=0, response_format=_fmt(True),
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_the_vllm_extra_body_fields(client):
    out = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Give me {\"name\": ...} for Alice "
                                                         "as JSON."}],
        max_tokens=60, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    out = client.completions.create(model="m", prompt="Call me at", max_tokens=20,
                                    temperature=0,
                                    extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", out.choices[0].text)
    out = client.completions.create(model="m", prompt="Yes or no?", max_tokens=5,
                                    extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].text in ("yes", "no")


@pytest.mark.parametrize("extra, param, words", [
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "position"),
    ({"guided_json": "{not json"}, "structured_outputs", "JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one output constraint"),
    ({"structured_outputs": {"pattern": "a"}}, "structured_outputs", "pattern"),
])
def test_bad_constraints_are_400s_naming_the_field(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="x", max_tokens=5, extra_body=extra)
    body = err.value.body
    assert body["param"] == param and words in body["message"], body
    out = client.completions.create(model="m", prompt="x", max_tokens=2)  # still serving
    assert out.choices[0].finish_reason == "length"
