"""`POST /v1/chat/completions`: messages through the tokenizer's chat template, answered whole
or streamed as `chat.completion.chunk` events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from astrai_serve.api.errors import OpenAIJSONResponse, bad_request
from astrai_serve.api.generation import (
    check_request,
    failure,
    new_id,
    raise_if_failed,
    sampling_params,
    serving_state,
    start_generation,
    tokenize,
    usage,
    vocab_size,
    wait_or_disconnect,
)
from astrai_serve.api.logprobs import TokenText, chat_logprobs
from astrai_serve.api.responses import ChatCompletionResponse, error_responses
from astrai_serve.api.schemas import CHAT_REFUSED, ChatCompletionRequest, ChatMessage
from astrai_serve.api.streaming import DONE, ChunkEncoder, EventStreamResponse, sse
from astrai_serve.api.watch import WatchGroup
from astrai_serve.engine import InferenceEngine

router = APIRouter()


@dataclass
class Reply:
    """What every chunk or response of one request repeats."""

    id: str
    created: int
    model: str
    prompt: list[int]
    n: int
    logprobs: bool
    text: TokenText


@router.post(
    "/v1/chat/completions", response_model=None,
    responses={200: {"model": ChatCompletionResponse,
                     "content": {"text/event-stream": {}}},
               **error_responses(400, 401, 404, 413, 503)},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completion (OpenAI-compatible); `stream: true` answers with server-sent events."""
    state = serving_state(request)
    engine = check_request(state, body, CHAT_REFUSED)
    prompt = await chat_prompt(engine, body.messages)
    window = engine.scheduler.max_seq_len
    max_tokens = body.max_completion_tokens or body.max_tokens or max(window - len(prompt), 1)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, top, vocab_size(engine))
    group = start_generation(state, engine, [prompt], params, body.num_choices, "messages")
    reply = Reply(new_id("chatcmpl"), int(time.time()), state.config.served_model_name, prompt,
                  body.num_choices, bool(body.logprobs), state.token_text)
    retry = state.config.retry_after_s
    if body.stream:
        return EventStreamResponse(chat_events(group, reply, body.include_usage, retry),
                                   on_close=group.close)
    try:
        if not await wait_or_disconnect(group, request):
            return Response(status_code=499)  # nobody is left to read it
        raise_if_failed(group, retry)
        return OpenAIJSONResponse(chat_response(group, reply).model_dump(mode="json"))
    finally:
        group.close()


async def chat_prompt(engine: InferenceEngine, messages: list[ChatMessage]) -> list[int]:
    chat = [m.for_template() for m in messages]
    size = sum(len(m["content"]) for m in chat)
    try:
        ids = await tokenize(engine.tokenizer.apply_chat_template, chat, size=size,
                             add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # a template refusing the conversation, or untokenizable text
        raise bad_request(f"the messages could not be rendered with the chat template: {exc}",
                          param="messages") from None
    return list(ids)


def chat_response(group: WatchGroup, reply: Reply) -> ChatCompletionResponse:
    choices = []
    for watch in group.watches:
        r = watch.result
        choices.append({
            "index": watch.index,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": chat_logprobs(r.logprobs, reply.text) if reply.logprobs else None,
            "finish_reason": r.finish_reason,
        })
    return ChatCompletionResponse.model_validate({
        "id": reply.id, "created": reply.created, "model": reply.model, "choices": choices,
        "usage": usage([reply.prompt], group, reply.n)})


async def chat_events(group: WatchGroup, reply: Reply, include_usage: bool, retry_after_s: int
                      ) -> AsyncIterator[bytes]:
    head = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
            "model": reply.model}
    tail = {"usage": None} if include_usage else {}

    encode = ChunkEncoder(head, tail)

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> bytes:
        return encode({"index": index, "delta": delta, "logprobs": logprobs,
                       "finish_reason": finish})

    for watch in group.watches:
        yield chunk(watch.index, {"role": "assistant", "content": ""})
    failed = None
    async for watch, delta in group.deltas():
        if delta.text or (reply.logprobs and delta.logprobs):
            logprobs = chat_logprobs(delta.logprobs, reply.text) if reply.logprobs else None
            yield chunk(watch.index, {"content": delta.text}, logprobs=logprobs)
        if delta.finish_reason is not None:
            failed = failed or failure(watch.result, retry_after_s)
            if failed is None:
                yield chunk(watch.index, {}, finish=delta.finish_reason)
    if failed is not None:
        yield sse(failed.body())
    elif include_usage:
        yield sse({**head, "choices": [], "usage": usage([reply.prompt], group, reply.n)})
    yield DONE
