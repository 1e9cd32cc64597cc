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


def test_a_constraint_that_fails_to_compile_in_the_core_is_a_400(client):
    """llguidance validates this Lark grammar without a tokenizer; with SmolLM2's tokenizer the
    token range does not exist, so it fails in the core, after admission: still a 400 naming
    the field, streamed as an error event; the server goes on."""
    extra = {"structured_outputs": {"grammar": 'start: "a" <[99999999]>'}}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="x", max_tokens=5, extra_body=extra)
    body = err.value.body
    assert body["param"] == "structured_outputs" and "Token range" in body["message"], body
    with pytest.raises(openai.APIError) as err:
        for _ in client.completions.create(model="m", prompt="x", max_tokens=5, stream=True,
                                           extra_body=extra):
            pass
    assert "Token range" in str(err.value), err.value
    out = client.completions.create(model="m", prompt="x", max_tokens=2)  # still serving
    assert out.choices[0].finish_reason == "length"


def _schemas() -> list[dict]:
    """20 schemas: nested objects, arrays, enums, number ranges, required fields and
    additionalProperties false, each bounded so a small model finishes."""
    name = {"type": "string", "maxLength": 12}
    obj = lambda props, req=None: {"type": "object", "properties": props,  # noqa: E731
                                   "required": req if req is not None else list(props),
                                   "additionalProperties": False}
    return [
        obj({"name": name, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
        obj({"colour": {"enum": ["red", "green", "blue"]}}),
        obj({"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0,
                                                  "maximum": 1}}),
        obj({"tags": {"type": "array", "items": name, "minItems": 1, "maxItems": 3}}),
        obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 999},
                          "name": name})}),
        obj({"point": obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                           "y": {"type": "integer", "minimum": -9, "maximum": 9}})}),
        obj({"status": {"enum": ["open", "closed"]}, "count": {"type": "integer",
                                                               "minimum": 0, "maximum": 50}}),
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
         "minItems": 2, "maxItems": 4},
        obj({"title": name, "year": {"type": "integer", "minimum": 1900, "maximum": 2030}}),
        obj({"city": name, "country": {"enum": ["FR", "DE", "IT", "ES"]}}),
        obj({"a": {"type": "integer", "minimum": 0, "maximum": 5}, "b": name}, ["a"]),
        obj({"items": {"type": "array", "maxItems": 2,
                       "items": obj({"sku": name, "qty": {"type": "integer", "minimum": 1,
                                                          "maximum": 9}})}}),
        obj({"level": {"enum": [1, 2, 3]}, "label": name}),
        obj({"price": {"type": "number", "minimum": 0, "maximum": 100}, "currency":
             {"enum": ["EUR", "USD"]}}),
        obj({"meta": obj({"owner": name, "flags": {"type": "array", "maxItems": 2,
                                                   "items": {"type": "boolean"}}})}),
        obj({"first": name, "last": name}),
        obj({"answer": {"enum": ["yes", "no", "maybe"]}, "confidence":
             {"type": "integer", "minimum": 0, "maximum": 100}}),
        obj({"matrix": {"type": "array", "maxItems": 2, "items": {
            "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                      "maximum": 9}}}}),
        obj({"email": {"type": "string", "maxLength": 20}, "verified": {"type": "boolean"}}),
        obj({"node": obj({"value": {"type": "integer", "minimum": 0, "maximum": 9},
                          "child": obj({"value": {"type": "integer", "minimum": 0,
                                                  "maximum": 9}})})}),
    ]


def test_twenty_schemas_in_a_batch_of_32_with_unconstrained_neighbours(client):
    import concurrent.futures

    schemas = _schemas()
    assert len(schemas) == 20
    plain_prompts = [f"Tell me one fact about the number {i}." for i in range(12)]

    def plain(i: int) -> str:
        out = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": plain_prompts[i]}],
            max_tokens=24, temperature=0)
        return out.choices[0].message.content

    def constrained(i: int) -> tuple[str, str]:
        kwargs = dict(model="m", max_tokens=160, temperature=0,
                      messages=[{"role": "user", "content": f"Answer as JSON (case {i})."}],
                      response_format={"type": "json_schema", "json_schema": {
                          "name": f"s{i}", "schema": schemas[i], "strict": True}})
        if i % 2:  # half of them streamed
            chunks = client.chat.completions.create(stream=True, **kwargs)
            text, finish = "", None
            for c in chunks:
                for choice in c.choices:
                    text += choice.delta.content or ""
                    finish = choice.finish_reason or finish
            return text, finish
        out = client.chat.completions.create(**kwargs)
        return out.choices[0].message.content, out.choices[0].finish_reason

    alone = [plain(i) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        constrained_f = [pool.submit(constrained, i) for i in range(20)]
        plain_f = [pool.submit(plain, i) for i in range(12)]
        results = [f.result() for f in constrained_f]
        together = [f.result() for f in plain_f]
    for schema, (text, finish) in zip(schemas, results):
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)
    assert together == alone
