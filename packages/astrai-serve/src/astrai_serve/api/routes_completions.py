"""`POST /v1/completions`: text (or token id) prompts continued as they are, answered whole or
streamed as `text_completion` events; choice i*n + j is sample j of prompt i."""

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
from astrai_serve.api.logprobs import TokenText, completion_logprobs
from astrai_serve.api.responses import CompletionResponse, error_responses
from astrai_serve.api.schemas import COMPLETION_REFUSED, CompletionRequest
from astrai_serve.api.streaming import DONE, ChunkEncoder, EventStreamResponse, sse
from astrai_serve.api.watch import WatchGroup
from astrai_serve.engine import InferenceEngine

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


@dataclass
class Reply:
    id: str
    created: int
    model: str
    prompts: list[list[int]]
    n: int
    logprobs: bool
    text: TokenText


@router.post(
    "/v1/completions", response_model=None,
    responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}},
               **error_responses(400, 401, 404, 413, 503)},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Text completion (OpenAI-compatible); `stream: true` answers with server-sent events."""
    state = serving_state(request)
    engine = check_request(state, body, COMPLETION_REFUSED)
    best_of = (body.model_extra or {}).get("best_of")
    if best_of not in (None, 1, body.num_choices):
        raise bad_request("best_of other than n is not supported; use n", param="best_of",
                          code="unsupported_parameter")
    prompts = await completion_prompts(engine, body.prompts())
    params = sampling_params(body, body.max_tokens or DEFAULT_MAX_TOKENS, body.logprobs,
                             vocab_size(engine))
    group = start_generation(state, engine, prompts, params, body.num_choices, "prompt")
    reply = Reply(new_id("cmpl"), int(time.time()), state.config.served_model_name, prompts,
                  body.num_choices, body.logprobs is not None, state.token_text)
    retry = state.config.retry_after_s
    if body.stream:
        return EventStreamResponse(completion_events(group, reply, body.include_usage, retry),
                                   on_close=group.close)
    try:
        if not await wait_or_disconnect(group, request):
            return Response(status_code=499)  # nobody is left to read it
        raise_if_failed(group, retry)
        return OpenAIJSONResponse(completion_response(group, reply).model_dump(mode="json"))
    finally:
        group.close()


async def completion_prompts(engine: InferenceEngine, prompts: list[str | list[int]]
                             ) -> list[list[int]]:
    vocab = vocab_size(engine)
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, list):
            if max(prompt) >= vocab:
                raise bad_request(f"prompt {i} has token id {max(prompt)}, beyond the model's "
                                  f"vocabulary of {vocab}", param="prompt")
            out.append(prompt)
            continue
        try:
            out.append(list(await tokenize(engine.tokenizer.encode, prompt, size=len(prompt))))
        except Exception as exc:  # text the tokenizer cannot take (e.g. a lone surrogate)
            raise bad_request(f"prompt {i} could not be tokenized: {exc}", param="prompt") from None
    return out


def completion_response(group: WatchGroup, reply: Reply) -> CompletionResponse:
    choices = []
    for watch in group.watches:
        r = watch.result
        logprobs = completion_logprobs(r.logprobs, reply.text)[0] if reply.logprobs else None
        choices.append({"index": watch.index, "text": r.text, "logprobs": logprobs,
                        "finish_reason": r.finish_reason})
    return CompletionResponse.model_validate({
        "id": reply.id, "created": reply.created, "model": reply.model, "choices": choices,
        "usage": usage(reply.prompts, group, reply.n)})


async def completion_events(group: WatchGroup, reply: Reply, include_usage: bool,
                            retry_after_s: int) -> AsyncIterator[bytes]:
    head = {"id": reply.id, "object": "text_completion", "created": reply.created,
            "model": reply.model}
    tail = {"usage": None} if include_usage else {}
    offsets = [0] * len(group.watches)  # text_offset of each choice's next token

    encode = ChunkEncoder(head, tail)

    def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> bytes:
        return encode({"index": index, "text": text, "logprobs": logprobs,
                       "finish_reason": finish})

    failed = None
    async for watch, delta in group.deltas():
        if delta.text or (reply.logprobs and delta.logprobs):
            logprobs = None
            if reply.logprobs:
                logprobs, offsets[watch.index] = completion_logprobs(
                    delta.logprobs, reply.text, offsets[watch.index])
            yield chunk(watch.index, delta.text, None, logprobs)
        if delta.finish_reason is not None:
            failed = failed or failure(watch.result, retry_after_s)
            if failed is None:
                yield chunk(watch.index, "", delta.finish_reason)
    if failed is not None:
        yield sse(failed.body())
    elif include_usage:
        yield sse({**head, "choices": [], "usage": usage(reply.prompts, group, reply.n)})
    yield DONE
