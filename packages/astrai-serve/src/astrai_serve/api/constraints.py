"""What a request constrains, as the grammar its sequences are sampled under: `response_format`
(json_object, json_schema) and the tools of a chat request (`tool_choice` "required" or a named
function force a call). Schemas compile in a worker thread; a schema the grammar library refuses
is a 400 naming the field and the part of the schema it refused."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from astrai_serve.api.errors import APIError, bad_request
from astrai_serve.api.schemas import ChatCompletionRequest, ResponseFormat, Tool
from astrai_serve.api.state import ServingState
from astrai_serve.api.tool_calls import Syntax, call_grammar, syntax_of
from astrai_serve.constrained import Grammar, GrammarCompiler, GrammarError, GrammarUnavailable
from astrai_serve.engine import InferenceEngine

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolSet:
    """The tools of a chat request, resolved: what the template renders and the parser looks
    for, and which calls (if any) the grammar forces."""

    tools: list[Tool]
    syntax: Syntax
    forced: list[Tool] | None  # None: the model may answer in text ("auto")
    many: bool  # "required" with parallel_tool_calls: one call or more

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def for_template(self) -> list[dict[str, Any]]:
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


def resolve_tools(body: ChatCompletionRequest, chat_template: str) -> ToolSet | None:
    """The request's tools, or None when it offers none or `tool_choice` is "none" (then the
    tools are not even shown to the model, and its answer is plain text)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice asks for a tool call but the request has no tools; "
                              "send tools or drop tool_choice", param="tool_choice")
        return None
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise bad_request(f"tools has two functions named '{twice}'; give each its own name",
                          param="tools")
    if choice == "none":
        return None
    forced: list[Tool] | None = None
    if choice == "required":
        forced = list(body.tools)
    elif choice is not None and choice != "auto":
        forced = [t for t in body.tools if t.function.name == choice.function.name]
        if not forced:
            raise bad_request(f"tool_choice names the function '{choice.function.name}', which "
                              f"is not among the tools ({', '.join(names)})",
                              param="tool_choice.function.name")
    many = choice == "required" and body.parallel_tool_calls is not False
    return ToolSet(list(body.tools), syntax_of(chat_template), forced, many)


async def response_grammar(state: ServingState, engine: InferenceEngine,
                           fmt: ResponseFormat | None) -> Grammar | None:
    if fmt is None or fmt.type == "text":
        return None
    compiler = await _compiler(state, engine)
    if fmt.type == "json_object":
        return await asyncio.to_thread(compiler.json_object)
    assert fmt.json_schema is not None  # the schema's validator checks it
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return await _compile(compiler.json_schema, schema, "response_format.json_schema.schema")


async def tool_grammar(state: ServingState, engine: InferenceEngine, tools: ToolSet | None
                       ) -> Grammar | None:
    """The grammar of a forced call: each function's parameters compile on their own first,
    so a refused schema is named by its tool."""
    if tools is None or tools.forced is None:
        return None
    compiler = await _compiler(state, engine)
    pairs = []
    for tool in tools.forced:
        index = tools.tools.index(tool)
        parameters = tool.function.parameters if tool.function.parameters is not None \
            else NO_ARGUMENTS
        await _compile(compiler.json_schema, parameters, f"tools.{index}.function.parameters")
        pairs.append((tool.function.name, parameters))
    text = call_grammar(tools.syntax, pairs, tools.many)
    return await _compile(compiler.lark, text, "tool_choice")


async def _compiler(state: ServingState, engine: InferenceEngine) -> GrammarCompiler:
    try:
        return await state.grammar_compiler(engine)
    except GrammarUnavailable as exc:
        raise APIError(501, f"this server cannot constrain outputs: {exc}",
                       code="grammar_unavailable") from None


async def _compile(compile_fn: Any, source: Any, param: str) -> Grammar:
    try:
        return await asyncio.to_thread(compile_fn, source)
    except GrammarError as exc:
        where = f" at {exc.path}" if exc.path else ""
        raise bad_request(f"{param}{where} was refused by the grammar library (llguidance): "
                          f"{exc}", param=param, code="invalid_schema") from None
