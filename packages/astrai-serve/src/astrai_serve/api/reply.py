"""The skeleton that chat and text completions share once their prompts and sampling parameters
are known: submit the n samples of each prompt, then stream the answer as server-sent events or
wait for it whole, count usage, and turn engine failures into OpenAI errors.

A route gives only what differs, as a `Reply` subclass: the shape of a choice in a stream chunk
and in a whole response (chat: `delta` / `message`, tool calls; completions: `text`, the echoed
prompt), and the names.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from astrai_serve.api.errors import APIError, OpenAIJSONResponse, unavailable
from astrai_serve.api.generation import new_id, serving_state, start_generation
from astrai_serve.api.logprobs import TokenText
from astrai_serve.api.schemas import SamplingFields
from astrai_serve.api.state import ServingState
from astrai_serve.api.streaming import DONE, ChunkEncoder, EventStreamResponse, sse
from astrai_serve.engine import InferenceEngine
from astrai_serve.request import GenerateResult
from astrai_serve.sampling import SamplingParams
from astrai_serve.watch import Delta, RequestWatch, WatchGroup

Choice = dict[str, Any]


class Reply(ABC):
    """One answer: what all its chunks repeat, and how its choices look."""

    id_prefix: ClassVar[str]  # "chatcmpl", "cmpl"
    chunk_object: ClassVar[str]  # the `object` of stream chunks
    response_model: ClassVar[type[BaseModel]]  # the whole response's body

    def __init__(self, state: ServingState, prompts: list[list[int]], n: int,
                 logprobs: bool, limit: int | None = None) -> None:
        assert state.token_text is not None  # set with the engine
        self.id = new_id(self.id_prefix)
        self.created = int(time.time())
        self.model = state.config.served_model_name
        self.prompts = prompts
        self.n = n  # samples per prompt; choice i * n + j is sample j of prompt i
        self.logprobs = logprobs
        self.limit = limit  # max_tokens as lowered to fit the context window, if it was
        self.token_text: TokenText = state.token_text

    def opening(self, watch: RequestWatch) -> Choice | None:
        """A chunk's choice sent before any text, or None."""
        return None

    @abstractmethod
    def delta_choice(self, watch: RequestWatch, delta: Delta) -> Choice:
        """A chunk's choice carrying new text (and its logprobs)."""

    def delta_choices(self, watch: RequestWatch, delta: Delta) -> list[Choice]:
        """The chunks' choices a delta makes (none when it brings nothing to show yet)."""
        if delta.text or (self.logprobs and delta.logprobs):
            return [self.delta_choice(watch, delta)]
        return []

    @abstractmethod
    def finish_choice(self, watch: RequestWatch, reason: str) -> Choice:
        """A chunk's choice that ends a sequence."""

    @abstractmethod
    def choice(self, watch: RequestWatch) -> Choice:
        """A whole response's choice."""


async def respond(request: Request, engine: InferenceEngine, body: SamplingFields, reply: Reply,
                  params: SamplingParams, param: str) -> Response:
    """Submit the reply's sequences and answer: streamed when the body asks, else whole.
    `param` names the body field that holds the prompts, for errors about them."""
    state = serving_state(request)
    reply.model = params.adapter or reply.model  # answers name the LoRA adapter that wrote them
    group = start_generation(state, engine, reply.prompts, params, reply.n, param)
    retry = state.config.retry_after_s
    if body.stream:
        return EventStreamResponse(events(reply, group, body.include_usage, retry),
                                   on_close=group.close)
    try:
        if not await wait_or_disconnect(group, request):
            return Response(status_code=499)  # nobody is left to read it
        for watch in group.watches:
            error = failure(watch.result, retry)
            if error is not None:
                raise error
        return OpenAIJSONResponse(whole(reply, group))
    finally:
        group.close()


def whole(reply: Reply, group: WatchGroup) -> dict[str, Any]:
    response = reply.response_model.model_validate({
        "id": reply.id, "created": reply.created, "model": reply.model,
        "choices": [reply.choice(watch) for watch in group.watches],
        "usage": usage(reply, group)})
    return response.model_dump(mode="json")


async def events(reply: Reply, group: WatchGroup, include_usage: bool, retry_after_s: int
                 ) -> AsyncIterator[bytes]:
    """The event stream: openings, deltas as they arrive, a finish per sequence, then usage
    (if asked) or the error that cut the stream short, and `[DONE]`."""
    head = {"id": reply.id, "object": reply.chunk_object, "created": reply.created,
            "model": reply.model}
    encode = ChunkEncoder(head, {"usage": None} if include_usage else {})
    for watch in group.watches:
        opening = reply.opening(watch)
        if opening is not None:
            yield encode(opening)
    failed = None
    async for watch, delta in group.deltas():
        for choice in reply.delta_choices(watch, delta):
            yield encode(choice)
        if delta.finish_reason is not None:
            failed = failed or failure(watch.result, retry_after_s)
            if failed is None:
                yield encode(reply.finish_choice(watch, delta.finish_reason))
    if failed is not None:
        yield sse(failed.body())
    elif include_usage:
        yield sse({**head, "choices": [], "usage": usage(reply, group)})
    yield DONE


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_or_disconnect(group: WatchGroup, request: Request) -> bool:
    """True once every sequence finished; False if the client left first (the caller's
    `group.close()` then aborts the rest)."""
    finished = asyncio.ensure_future(group.wait())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished.cancel()
        gone.cancel()
    return finished.done() and not finished.cancelled()


def failure(result: GenerateResult, retry_after_s: int) -> APIError | None:
    """Why a finished sequence has no proper answer (the engine died or shut down), or None."""
    if result.error is not None:
        return unavailable(f"the engine failed during this request: {result.error}",
                           "engine_failed")
    if result.finish_reason == "abort":
        return unavailable("the request was aborted: the server is shutting down", "aborted",
                           retry_after_s)
    return None


def usage(reply: Reply, group: WatchGroup | None) -> dict[str, Any]:
    """Token counts: each prompt once (as OpenAI counts n > 1), every generated token id, and
    the lowered max_tokens if it was (`Reply.limit`). No group: nothing was generated."""
    watches = group.watches if group is not None else []
    prompt_tokens = sum(len(p) for p in reply.prompts)
    completion = sum(w.result.generated_tokens for w in watches)
    cached = sum(w.result.cached_tokens for w in watches[::reply.n])
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                           "total_tokens": prompt_tokens + completion,
                           "prompt_tokens_details": {"cached_tokens": cached}}
    if reply.limit is not None:
        out["completion_tokens_limit"] = reply.limit
    return out
