"""Structured outputs: `response_format` json_schema and json_object, sampled under llguidance's
grammar. A model with random weights knows no JSON, so every valid answer here is the grammar's
doing; the mask step itself is checked token by token against the library's own validator."""

from __future__ import annotations

import json
import sys
from typing import Literal

import httpx
import pytest
import torch
from constrained_helpers import openai_client, random_model, served
from pydantic import BaseModel, Field

from astrai_serve import InferenceEngine, SamplingParams
from astrai_serve.constrained import GrammarCompiler, GrammarError
from astrai_serve.sampling import SamplingPipeline, TokenMaskStrategy

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")

USER = [{"role": "user", "content": "Describe a pet."}]


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog", "fish"]
    vaccinated: bool
    toys: list[Literal["ball", "rope", "bell"]] = Field(max_length=3)


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with served(model, tokenizer) as (engine, url):
        yield engine, url


@pytest.fixture(scope="module")
def compiler(tokenizer, server):
    engine, _ = server
    return GrammarCompiler(tokenizer, engine.model.config.vocab_size, tokenizer.stop_ids)


def test_parse_with_a_pydantic_model_always_returns_a_valid_object(server):
    client = openai_client(server[1])
    for seed in range(4):
        answer = client.chat.completions.parse(model="tiny", messages=USER, response_format=Pet,
                                               n=2, seed=seed, max_tokens=300)
        for choice in answer.choices:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Pet), choice.message.content
            assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_streamed_json_schema_joins_to_a_valid_object(server):
    client = openai_client(server[1])
    schema = {"name": "pet", "schema": Pet.model_json_schema(), "strict": True}
    chunks = list(client.chat.completions.create(
        model="tiny", messages=USER, stream=True, seed=11, max_tokens=300,
        response_format={"type": "json_schema", "json_schema": schema}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    Pet.model_validate_json(text)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3


def test_completions_take_response_format_too(server):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "score": {"type": "integer", "minimum": 1,
                                                         "maximum": 5}},
              "required": ["answer", "score"], "additionalProperties": False}
    client = openai_client(server[1])
    answer = client.completions.create(
        model="tiny", prompt="Is it raining?", max_tokens=40, seed=3, n=3,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "a", "schema": schema}}})
    for choice in answer.choices:
        value = json.loads(choice.text)
        assert set(value) == {"answer", "score"} and value["answer"] in ("yes", "no")
        assert 1 <= value["score"] <= 5 and choice.finish_reason == "stop"


def test_json_object_answers_that_finish_parse_as_objects(server):
    finished = 0
    for seed in range(6):
        body = {"messages": USER, "response_format": {"type": "json_object"}, "seed": seed,
                "max_tokens": 400}
        choice = httpx.post(f"{server[1]}/v1/chat/completions", json=body,
                            timeout=120).json()["choices"][0]
        text = choice["message"]["content"]
        assert text.startswith("{")
        if choice["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens inside a long string: an unfinished object, as OpenAI's
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
    assert finished >= 1


@pytest.mark.parametrize(("schema", "where", "says"), [
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "a(?=b)"}}},
     "/properties/code", "look-around"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "frobnicate"}}}},
     "/properties/a/items", "frobnicate"),
    ({"$ref": "#/$defs/missing"}, None, "missing"),
])
def test_a_schema_the_library_refuses_is_a_400_naming_the_part(server, schema, where, says):
    body = {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    response = httpx.post(f"{server[1]}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert error["code"] == "invalid_schema" and says in error["message"]
    if where is not None:
        assert f"schema at {where} was refused" in error["message"]
    assert httpx.get(f"{server[1]}/health").status_code == 200


def test_json_schema_without_its_schema_object_is_a_400(server):
    body = {"messages": USER, "response_format": {"type": "json_schema"}}
    response = httpx.post(f"{server[1]}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_the_mask_keeps_exactly_the_tokens_the_grammar_accepts(compiler, tokenizer):
    """Row by row against llguidance's own validator (`validate_tokens`, another code path
    than the mask): constrained rows keep exactly the valid tokens, free rows are untouched."""
    grammar = compiler.json_schema(Pet.model_json_schema())
    matcher = grammar.matcher()
    prefix = tokenizer.encode('{"name":"Re')
    for token in prefix:
        matcher.accept(token)
    V = compiler.vocab_size
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    masked = TokenMaskStrategy([None, matcher, None]).apply(logits.clone())
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    valid = [t for t in range(V) if matcher._matcher.validate_tokens([t]) == 1]
    kept = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert kept == valid and 0 < len(valid) < V
    assert torch.equal(masked[1][kept], logits[1][kept])


def test_one_row_at_a_time_and_all_at_once_fill_the_same_bits(compiler, tokenizer):
    grammar = compiler.json_schema(Pet.model_json_schema())
    matchers = [grammar.matcher() for _ in range(3)]
    for k, text in enumerate(['{"name":"A","age":3', '{"na', ""]):
        for token in tokenizer.encode(text):
            matchers[k].accept(token)
    words = (compiler.vocab_size + 31) // 32
    one, many = (torch.zeros(3, words, dtype=torch.int32) for _ in range(2))
    for j, matcher in enumerate(matchers):
        matcher.fill_bitmask(one, j)
    type(matchers[0]).fill_bitmasks(matchers, many)
    assert torch.equal(one, many) and len({tuple(r.tolist()) for r in one}) == 3


def test_a_greedy_free_row_is_unchanged_by_constrained_neighbours(model, tokenizer, compiler):
    grammar = compiler.json_schema(Pet.model_json_schema())
    prompt = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with InferenceEngine(model, tokenizer, page_size=16) as engine:
        alone = engine.submit(prompt, free).wait_completion().token_ids
        together = engine.submit_many(
            [prompt] * 4, [SamplingParams(temperature=0.8, seed=1, max_tokens=200, grammar=grammar),
                           free, SamplingParams(temperature=0, max_tokens=200, grammar=grammar),
                           free])
        results = [r.wait_completion() for r in together]
    assert results[1].token_ids == alone and results[3].token_ids == alone
    for r in (results[0], results[2]):
        Pet.model_validate_json(tokenizer.decode(r.token_ids))
        assert r.finish_reason == "stop"


def test_a_pipeline_without_constrained_rows_has_no_mask_step():
    params = [SamplingParams(temperature=0.7, top_p=0.9)] * 4
    pipeline = SamplingPipeline.from_params(params, matchers=[None] * 4)
    assert not any(isinstance(s, TokenMaskStrategy) for s in pipeline.strategies)


def test_compiled_schemas_are_reused(compiler):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert compiler.json_schema(schema) is compiler.json_schema(dict(schema))
    with pytest.raises(GrammarError) as refused:
        compiler.json_schema({"type": "string", "format": "no-such-format"})
    assert "no-such-format" in str(refused.value) and refused.value.path == ""


def test_without_llguidance_a_constrained_request_gets_501_with_the_fix(model, tokenizer,
                                                                         monkeypatch):
    with served(model, tokenizer) as (_, url):
        monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now fails
        body = {"messages": USER, "response_format": {"type": "json_object"}, "max_tokens": 4}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 501, response.text
        assert "pip install" in response.json()["error"]["message"]
        free = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert free.status_code == 200
