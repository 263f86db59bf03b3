"""Tool calls: tools rendered through the chat template, calls parsed out of the model's text
(whole and streamed, as the official `openai` client reads them), forced calls constrained by
the grammar, and a full round trip: call, tool result, final answer."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import pytest
from api_helpers import sse_payloads
from constrained_helpers import openai_client, random_model, served, trained_to_answer
from pydantic import BaseModel, ConfigDict, Field

from astrai_core.tokenizer import AutoTokenizer
from astrai_serve.api.tool_calls import ToolCallParser, call_grammar

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    unit: Literal["c", "f"]


class LookupArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(max_length=16)


def tool(name: str, args: type[BaseModel], description: str) -> dict:
    schema = args.model_json_schema()
    schema.pop("title", None)
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": schema}}


TOOLS = [tool("get_weather", WeatherArgs, "The weather in a city."),
         tool("lookup", LookupArgs, "Search the notes.")]
ARGS = {"get_weather": WeatherArgs, "lookup": LookupArgs}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' \
            '</tool_call>'


def check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    ARGS[call.function.name].model_validate_json(call.function.arguments)


@pytest.fixture(scope="module")
def server(tokenizer):
    with served(random_model(), tokenizer) as (engine, url):
        yield engine, url


# -- parsing ------------------------------------------------------------------------------------
def parse_whole(text: str, syntax: str = "tagged") -> tuple[str, list]:
    parser = ToolCallParser(syntax, {"get_weather", "lookup"})
    head, calls = parser.feed(text)
    rest, more = parser.finish()
    return head + rest, calls + more


def parse_streamed(text: str, syntax: str = "tagged") -> tuple[str, list]:
    parser = ToolCallParser(syntax, {"get_weather", "lookup"})
    content, calls = "", []
    for char in text:
        piece, new = parser.feed(char)
        content, calls = content + piece, calls + new
    rest, more = parser.finish()
    return content + rest, calls + more


@pytest.mark.parametrize(("text", "content", "names"), [
    (CALL_TEXT, "", ["get_weather"]),
    ("Let me check.\n" + CALL_TEXT, "Let me check.", ["get_weather"]),
    (CALL_TEXT + "\n" + CALL_TEXT.replace("get_weather", "lookup").replace(
        '"city": "Paris", "unit": "c"', '"query": "rain"'), "", ["get_weather", "lookup"]),
    ('<tool_call>\n{"name": "lookup", "arguments": {"query": "x"}}', "", ["lookup"]),  # unclosed
    ('<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>', []),  # not a tool offered
    ("a < b and <tool no", "a < b and <tool no", []),
    ('<tool_call>{"name": "lookup", "arguments": not json</tool_call> ok',
     '<tool_call>{"name": "lookup", "arguments": not json</tool_call> ok', []),
])
def test_tagged_calls_parse_the_same_whole_and_streamed(text, content, names):
    for parse in (parse_whole, parse_streamed):
        got_content, calls = parse(text)
        assert got_content == content and [c.name for c in calls] == names, parse
        for call in calls:
            assert isinstance(json.loads(call.arguments), dict)


@pytest.mark.parametrize(("text", "content", "names"), [
    ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}', "", ["get_weather"]),
    ('  {"name": "lookup", "parameters": {"query": "a"}}; {"name": "lookup", "parameters": '
     '{"query": "b"}}', "", ["lookup", "lookup"]),
    ("It is sunny.", "It is sunny.", []),
    ('{"answer": 42}', '{"answer": 42}', []),
])
def test_json_calls_as_llama_writes_them(text, content, names):
    for parse in (parse_whole, parse_streamed):
        got_content, calls = parse(text, "json")
        assert got_content.strip() == content and [c.name for c in calls] == names


def test_text_around_calls_streams_before_the_call_is_complete():
    parser = ToolCallParser("tagged", {"get_weather"})
    assert parser.feed("Checking the weather <tool") == ("Checking the weather", [])
    assert parser.feed("_call>{\"name\": \"get_weather\", ") == ("", [])
    content, calls = parser.feed('"arguments": {"city": "Rome", "unit": "c"}}</tool_call>')
    assert content == "" and calls[0].name == "get_weather"
    assert parser.finish() == ("", [])


# -- forced calls through the server --------------------------------------------------------------
def test_a_named_function_is_always_called_with_valid_arguments(server):
    client = openai_client(server[1])
    for seed in range(3):
        answer = client.chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, seed=seed, max_tokens=200, n=2,
            tool_choice={"type": "function", "function": {"name": "lookup"}})
        for choice in answer.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (call,) = choice.message.tool_calls
            assert call.function.name == "lookup"
            check_call(call)


def test_required_makes_one_or_more_valid_calls_and_streams_them(server):
    client = openai_client(server[1])
    for seed in range(3):
        answer = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                tool_choice="required", seed=seed,
                                                max_tokens=400)
        choice = answer.choices[0]
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call)
        # A random model may keep adding calls (the grammar allows one or more) until the
        # token limit: then the complete calls are still returned, and the limit is why it ended.
        if choice.finish_reason != "tool_calls":
            # The limit is max_tokens, or less where the context window cut it (reported).
            limit = getattr(answer.usage, "completion_tokens_limit", None) or 400
            assert choice.finish_reason == "length" and answer.usage.completion_tokens == limit
    with client.chat.completions.stream(model="tiny", messages=USER, tools=TOOLS, seed=5,
                                        tool_choice="required", parallel_tool_calls=False,
                                        max_tokens=200) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    check_call(call)


def test_stream_deltas_carry_each_call_with_its_index_id_and_arguments(server):
    # One call (parallel_tool_calls false): the grammar then ends the reply after it, so the
    # stream's end is the call's end on any machine, whatever the random model prefers.
    body = {"messages": USER, "tools": TOOLS, "tool_choice": "required", "seed": 2,
            "parallel_tool_calls": False,
            "max_tokens": 400, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server[1]}/v1/chat/completions", json=body,
                      timeout=120) as response:
        events = sse_payloads(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0]
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        ARGS[call["function"]["name"]].model_validate_json(call["function"]["arguments"])
    assert all(not d.get("content") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # Every generated token's logprob goes out, though its text went into a call.
    logprobs = [e for c in chunks if c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert len(logprobs) == events[-2]["usage"]["completion_tokens"] > 0


def test_round_trip_call_tool_result_final_answer(server, tokenizer):
    client = openai_client(server[1])
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, seed=0,
                                           tool_choice=named, max_tokens=200)
    message = first.choices[0].message
    (call,) = message.tool_calls
    check_call(call)
    conversation = [*USER, message,
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = client.chat.completions.create(model="tiny", messages=conversation, tools=TOOLS,
                                           max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    choice = final.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
    # The server rendered the call and the result as the template renders them.
    rendered = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "content": "sunny, 21 C"}]
    text = tokenizer.apply_chat_template(rendered, tools=TOOLS, tokenize=False)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": ' in text
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in text
    assert final.usage.prompt_tokens == len(tokenizer.encode(text))


# -- a model that calls on its own ("auto") ---------------------------------------------------------
@pytest.fixture(scope="module")
def caller(tokenizer):
    """A model trained to answer USER (with TOOLS) by a sentence and a call."""
    prompt = tokenizer.apply_chat_template(USER, tools=TOOLS, add_generation_prompt=True)
    answer = [*tokenizer.encode("Let me check.\n" + CALL_TEXT), tokenizer.token_to_id("<|im_end|>")]
    with served(trained_to_answer(prompt, answer), tokenizer) as (_, url):
        yield url


def test_auto_parses_the_model_s_own_call_whole_and_streamed(caller):
    client = openai_client(caller)
    answer = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                            temperature=0, max_tokens=120)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                 temperature=0, max_tokens=120, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert content == "Let me check." and [t.function.name for t in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_hides_the_tools_and_answers_in_text(caller, tokenizer):
    client = openai_client(caller)
    answer = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=6)
    plain = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    assert answer.usage.prompt_tokens == len(plain)
    assert answer.choices[0].message.tool_calls is None


# -- templates and refusals -------------------------------------------------------------------------
LLAMA_LIKE = """{%- if tools -%}<|im_start|>system
Answer with a call {"name": function name, "parameters": dictionary of argument name and its value}. Functions: {{ tools | tojson }}<|im_end|>
{% endif -%}
{%- for m in messages -%}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% endif -%}"""


def retemplated(tokenizer, tmp_path, template: str) -> AutoTokenizer:
    tokenizer.save_pretrained(tmp_path / "tok")
    copy = AutoTokenizer.from_pretrained(tmp_path / "tok")
    copy.set_chat_template(template)
    return copy


def test_a_template_without_tags_gets_json_calls_with_parameters(tokenizer, tmp_path):
    llama = retemplated(tokenizer, tmp_path, LLAMA_LIKE)
    with served(random_model(), llama) as (_, url):
        answer = openai_client(url).chat.completions.create(
            model="tiny", messages=USER, tools=TOOLS, seed=1, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = answer.choices[0].message.tool_calls
    check_call(call)
    assert answer.choices[0].finish_reason == "tool_calls"


def test_a_template_that_ignores_tools_is_refused(tokenizer, tmp_path):
    blind = retemplated(tokenizer, tmp_path, "{% for m in messages %}{{ m.content }}{% endfor %}")
    with served(random_model(), blind) as (_, url):
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                              json={"messages": USER, "tools": TOOLS})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    assert "does not render tools" in response.json()["error"]["message"]


BAD_PARAMETERS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"code": {"type": "string", "pattern": "(?<=x)y"}}}}}]


@pytest.mark.parametrize(("extra", "param", "says"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "'nope'"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "two functions named 'get_weather'"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
    ({"tools": BAD_PARAMETERS, "tool_choice": "required"}, "tools.0.function.parameters",
     "at /properties/code"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name",
     "pattern"),
])
def test_tool_requests_that_cannot_be_served_are_400s(server, extra, param, says):
    body = {"messages": USER, "tools": TOOLS, "max_tokens": 4, **extra}
    response = httpx.post(f"{server[1]}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_the_forced_grammar_spells_calls_as_the_templates_show_them():
    grammar = call_grammar("tagged", [("f", {"type": "object"})], many=False)
    assert '"{\\"name\\": \\"f\\", \\"arguments\\": "' in grammar and "<tool_call>" in grammar
    assert '\\"parameters\\": ' in call_grammar("json", [("f", {"type": "object"})], many=False)
