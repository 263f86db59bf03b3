"""`POST /v1/chat/completions`: messages (and tools) through the tokenizer's chat template,
answered whole or streamed as `chat.completion.chunk` events (the skeleton is `reply.respond`);
the model's tool calls are parsed out of its text into `tool_calls`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from astrai_serve.api.constraints import ToolSet, resolve_tools, response_grammar, tool_grammar
from astrai_serve.api.errors import APIError, bad_request
from astrai_serve.api.generation import (
    check_request,
    check_text,
    requested_adapter,
    sampling_params,
    serving_state,
    token_budget,
    tokenize,
    vocab_size,
)
from astrai_serve.api.logprobs import chat_logprobs
from astrai_serve.api.reply import Choice, Reply, respond
from astrai_serve.api.responses import ChatCompletionResponse, error_responses
from astrai_serve.api.schemas import CHAT_REFUSED, ChatCompletionRequest, ChatMessage
from astrai_serve.api.state import ServingState
from astrai_serve.api.tool_calls import ToolCall, ToolCallParser
from astrai_serve.engine import InferenceEngine
from astrai_serve.request import TokenLogprob
from astrai_serve.watch import Delta, RequestWatch

router = APIRouter()


@router.post(
    "/v1/chat/completions", response_model=None,
    responses={200: {"model": ChatCompletionResponse,
                     "content": {"text/event-stream": {}}},
               **error_responses(400, 401, 404, 413, 501, 503)},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completion (OpenAI-compatible); `stream: true` answers with server-sent events."""
    state = serving_state(request)
    engine = check_request(state, body, CHAT_REFUSED)
    check_text([m.model_dump() for m in body.messages], "messages")
    check_text([t.model_dump() for t in body.tools or []], "tools")
    tools = resolve_tools(body, engine.tokenizer.chat_template)
    constrained_format = body.response_format is not None and body.response_format.type != "text"
    if tools is not None and tools.forced is not None and constrained_format:
        raise bad_request("response_format cannot be combined with a forced tool call "
                          "(tool_choice 'required' or a named function); drop one of them",
                          param="response_format")
    prompt = await chat_prompt(engine, body.messages, tools)
    asked = body.max_completion_tokens or body.max_tokens
    max_tokens, limit = token_budget(asked, [prompt], engine, "messages")
    grammar = await response_grammar(state, engine, body.response_format)
    grammar = grammar or await tool_grammar(state, engine, tools)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, top, vocab_size(engine), grammar,
                             requested_adapter(state, body))
    reply = ChatReply(state, [prompt], body.num_choices, bool(body.logprobs), limit, tools)
    return await respond(request, engine, body, reply, params, "messages")


async def chat_prompt(engine: InferenceEngine, messages: list[ChatMessage],
                      tools: ToolSet | None = None) -> list[int]:
    chat = [m.for_template() for m in messages]
    size = sum(len(m["content"]) for m in chat)
    apply = engine.tokenizer.apply_chat_template
    try:
        if tools is not None:
            with_tools = apply(chat, add_generation_prompt=True, tokenize=False,
                               tools=tools.for_template())
            if with_tools == apply(chat, add_generation_prompt=True, tokenize=False):
                raise bad_request("the chat template of this model does not render tools, so "
                                  "the model could not know them; use a model whose template "
                                  "has a tools section, or drop tools", param="tools")
            return list(await tokenize(engine.tokenizer.encode, with_tools, size=size))
        ids = await tokenize(apply, chat, size=size, add_generation_prompt=True, tokenize=True)
    except APIError:
        raise
    except Exception as exc:  # a template refusing the conversation
        raise bad_request(f"the messages could not be rendered with the chat template: {exc}",
                          param="messages") from None
    return list(ids)


class ChatReply(Reply):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    response_model = ChatCompletionResponse

    def __init__(self, state: ServingState, prompts: list[list[int]], n: int, logprobs: bool,
                 limit: int | None = None, tools: ToolSet | None = None) -> None:
        super().__init__(state, prompts, n, logprobs, limit)
        self.tools = tools
        self._parsers: dict[int, ToolCallParser] = {}
        self._held: dict[int, list[TokenLogprob]] = {}  # logprobs of text held by the parser

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        return chat_logprobs(entries, self.token_text) if self.logprobs else None

    def _parser(self, index: int) -> ToolCallParser:
        assert self.tools is not None
        if index not in self._parsers:
            self._parsers[index] = ToolCallParser(self.tools.syntax, self.tools.names)
        return self._parsers[index]

    def _reason(self, index: int, reason: str | None) -> str | None:
        called = index in self._parsers and self._parsers[index].calls
        return "tool_calls" if called and reason == "stop" else reason

    def opening(self, watch: RequestWatch) -> Choice:
        return {"index": watch.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}

    def delta_choice(self, watch: RequestWatch, delta: Delta) -> Choice:
        return {"index": watch.index, "delta": {"content": delta.text},
                "logprobs": self._logprobs(delta.logprobs), "finish_reason": None}

    def delta_choices(self, watch: RequestWatch, delta: Delta) -> list[Choice]:
        if self.tools is None:
            return super().delta_choices(watch, delta)
        parser = self._parser(watch.index)
        content, calls = parser.feed(delta.text)
        if delta.finish_reason is not None:
            rest, more = parser.finish()
            content, calls = content + rest, calls + more
        held = self._held.setdefault(watch.index, [])
        held += delta.logprobs
        deltas: list[dict[str, Any]] = [{"content": content}] if content else []
        first = len(parser.calls) - len(calls)
        deltas += [{"tool_calls": [call.as_openai(first + k)]} for k, call in enumerate(calls)]
        if not deltas and delta.finish_reason is not None and self.logprobs and held:
            deltas = [{"content": ""}]  # logprobs of text that came to nothing still go out
        out = []
        for piece in deltas:
            logprobs, held[:] = (self._logprobs(held) if held else None), []
            out.append({"index": watch.index, "delta": piece, "logprobs": logprobs,
                        "finish_reason": None})
        return out

    def finish_choice(self, watch: RequestWatch, reason: str) -> Choice:
        return {"index": watch.index, "delta": {}, "logprobs": None,
                "finish_reason": self._reason(watch.index, reason)}

    def choice(self, watch: RequestWatch) -> Choice:
        r = watch.result
        content: str | None = r.text
        calls: list[ToolCall] = []
        if self.tools is not None:
            parser = self._parser(watch.index)
            head, calls = parser.feed(r.text)
            rest, more = parser.finish()
            content, calls = head + rest, calls + more
            if calls and not content:
                content = None
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.as_openai() for call in calls]
        return {"index": watch.index, "message": message,
                "logprobs": self._logprobs(r.logprobs),
                "finish_reason": self._reason(watch.index, r.finish_reason)}
