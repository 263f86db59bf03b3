"""`POST /v1/completions`: text (or token id) prompts continued as they are, answered whole or
streamed as `text_completion` events (the skeleton is `reply.respond`); choice i*n + j is
sample j of prompt i. With `echo` the prompt comes first, and with `logprobs` too its tokens'
log-probabilities (`scoring.py`); `max_tokens: 0` then scores the prompt without generating."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from astrai_serve.api.constraints import response_grammar
from astrai_serve.api.errors import OpenAIJSONResponse, bad_request, unavailable
from astrai_serve.api.generation import (
    check_prompts,
    check_request,
    check_text,
    requested_adapter,
    sampling_params,
    serving_state,
    token_budget,
    tokenize,
    vocab_size,
)
from astrai_serve.api.logprobs import completion_logprobs, prompt_logprobs_legacy
from astrai_serve.api.reply import Choice, Reply, respond, usage
from astrai_serve.api.responses import CompletionResponse, error_responses
from astrai_serve.api.schemas import COMPLETION_REFUSED, CompletionRequest
from astrai_serve.api.scoring import score_prompts
from astrai_serve.api.state import ServingState
from astrai_serve.api.streaming import DONE, ChunkEncoder, EventStreamResponse, sse
from astrai_serve.engine import InferenceEngine
from astrai_serve.request import TokenLogprob
from astrai_serve.watch import Delta, RequestWatch

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


@router.post(
    "/v1/completions", response_model=None,
    responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}},
               **error_responses(400, 401, 404, 413, 501, 503)},
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Text completion (OpenAI-compatible); `stream: true` answers with server-sent events."""
    state = serving_state(request)
    engine = check_request(state, body, COMPLETION_REFUSED)
    best_of = (body.model_extra or {}).get("best_of")
    if best_of not in (None, 1, body.num_choices):
        raise bad_request("best_of other than n is not supported; use n", param="best_of",
                          code="unsupported_parameter")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens 0 generates nothing; send echo: true (with logprobs) to "
                          "score the prompt, or ask for at least one token", param="max_tokens")
    check_text(body.prompt, "prompt")
    raw = body.prompts()
    prompts = await completion_prompts(engine, raw)
    check_prompts(prompts, engine, "prompt")
    adapter = requested_adapter(state, body)
    echo = None
    if body.echo:
        echo = await echoed(engine, raw, prompts, body.logprobs, adapter)
    if body.max_tokens == 0:
        reply = CompletionReply(state, prompts, body.num_choices, body.logprobs is not None,
                                echo=echo)
        reply.model = adapter or reply.model
        return scored_only(reply, body)
    max_tokens, limit = token_budget(body.max_tokens, prompts, engine, "prompt",
                                     default=DEFAULT_MAX_TOKENS)
    grammar = await response_grammar(state, engine, body.response_format)
    params = sampling_params(body, max_tokens, body.logprobs, vocab_size(engine), grammar,
                             adapter)
    reply = CompletionReply(state, prompts, body.num_choices, body.logprobs is not None, limit,
                            echo)
    return await respond(request, engine, body, reply, params, "prompt")


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
        except Exception as exc:  # text the tokenizer cannot take
            raise bad_request(f"prompt {i} could not be tokenized: {exc}", param="prompt") from None
    return out


class Echo:
    """The prompts as echoed: their text and, when logprobs are asked, their tokens' scores."""

    def __init__(self, texts: list[str], scores: list[list[TokenLogprob | None]] | None) -> None:
        self.texts = texts
        self.scores = scores


async def echoed(engine: InferenceEngine, raw: list[str | list[int]], prompts: list[list[int]],
                 logprobs: int | None, adapter: str | None = None) -> Echo:
    texts = [p if isinstance(p, str) else engine.tokenizer.decode(p, skip_special_tokens=False)
             for p in raw]
    if logprobs is None:
        return Echo(texts, None)
    try:
        return Echo(texts, await score_prompts(engine, prompts, logprobs, adapter))
    except RuntimeError as exc:  # the engine stopped or died meanwhile
        raise unavailable(f"the engine cannot score prompts: {exc}", "engine_unavailable") from None


class CompletionReply(Reply):
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    response_model = CompletionResponse

    def __init__(self, state: ServingState, prompts: list[list[int]], n: int,
                 logprobs: bool, limit: int | None = None, echo: Echo | None = None) -> None:
        super().__init__(state, prompts, n, logprobs, limit)
        self.echo = echo
        self._offsets = [0] * (len(prompts) * n)  # text_offset of each choice's next token

    def echo_choice(self, index: int) -> Choice:
        """Choice `index`'s prompt as echoed, with its logprobs; sets where the rest goes on."""
        assert self.echo is not None
        prompt = index // self.n
        logprobs = None
        if self.logprobs and self.echo.scores is not None:
            logprobs, self._offsets[index] = prompt_logprobs_legacy(
                self.prompts[prompt], self.echo.scores[prompt], self.token_text)
        return {"index": index, "text": self.echo.texts[prompt], "logprobs": logprobs,
                "finish_reason": None}

    def opening(self, watch: RequestWatch) -> Choice | None:
        return self.echo_choice(watch.index) if self.echo is not None else None

    def delta_choice(self, watch: RequestWatch, delta: Delta) -> Choice:
        logprobs = None
        if self.logprobs:
            logprobs, self._offsets[watch.index] = completion_logprobs(
                delta.logprobs, self.token_text, self._offsets[watch.index])
        return {"index": watch.index, "text": delta.text, "logprobs": logprobs,
                "finish_reason": None}

    def finish_choice(self, watch: RequestWatch, reason: str) -> Choice:
        return {"index": watch.index, "text": "", "logprobs": None, "finish_reason": reason}

    def choice(self, watch: RequestWatch) -> Choice:
        r = watch.result
        head = self.echo_choice(watch.index) if self.echo is not None else None
        logprobs = None
        if self.logprobs:
            logprobs, _ = completion_logprobs(r.logprobs, self.token_text,
                                              self._offsets[watch.index])
            if head is not None and head["logprobs"] is not None:
                logprobs = {k: head["logprobs"][k] + logprobs[k] for k in logprobs}
        text = (head["text"] if head is not None else "") + r.text
        return {"index": watch.index, "text": text, "logprobs": logprobs,
                "finish_reason": r.finish_reason}


def scored_only(reply: CompletionReply, body: CompletionRequest) -> Response:
    """The answer to `max_tokens: 0`: each choice is its prompt, scored, and nothing more."""
    choices = [reply.echo_choice(i) for i in range(len(reply.prompts) * reply.n)]
    if not body.stream:
        return OpenAIJSONResponse(reply.response_model.model_validate({
            "id": reply.id, "created": reply.created, "model": reply.model,
            "choices": [{**c, "finish_reason": "length"} for c in choices],
            "usage": usage(reply, None)}).model_dump(mode="json"))

    async def events() -> AsyncIterator[bytes]:
        head: dict[str, Any] = {"id": reply.id, "object": reply.chunk_object,
                                "created": reply.created, "model": reply.model}
        encode = ChunkEncoder(head, {"usage": None} if body.include_usage else {})
        for choice in choices:
            yield encode(choice)
            yield encode({"index": choice["index"], "text": "", "logprobs": None,
                          "finish_reason": "length"})
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": usage(reply, None)})
        yield DONE

    return EventStreamResponse(events(), on_close=lambda: None)
