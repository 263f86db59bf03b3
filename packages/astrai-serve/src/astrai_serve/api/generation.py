"""What chat and text completions share: checking the model name and refused fields, turning a
request into `SamplingParams`, admitting and submitting its sequences, waiting for them, and
reporting usage and failures."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import Request

from astrai_serve.api.errors import APIError, bad_request, unavailable
from astrai_serve.api.schemas import SamplingFields, refused_fields
from astrai_serve.api.state import ServingState
from astrai_serve.api.watch import WatchGroup
from astrai_serve.engine import InferenceEngine
from astrai_serve.request import GenerateResult
from astrai_serve.sampling import SamplingParams

# Below this a temperature divides logits into overflow; it can only mean greedy (as in vLLM).
GREEDY_BELOW = 1e-5
LARGE_TEXT = 32_768  # characters; tokenizing more than this leaves the event loop


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def serving_state(request: Request) -> ServingState:
    return request.app.state.serving


def check_request(state: ServingState, body: SamplingFields,
                  refused: Mapping[str, Callable[[Any], bool]]) -> InferenceEngine:
    """The engine, once the request may be served at all."""
    engine = state.ready_engine()
    name = state.config.served_model_name
    if body.model is not None and body.model != name:
        raise APIError(404, f"model '{body.model}' does not exist; this server serves '{name}'",
                       param="model", code="model_not_found")
    names = refused_fields(body.model_extra, refused)
    if names:
        raise bad_request(f"'{names[0]}' is not supported by this server; remove it",
                          param=names[0], code="unsupported_parameter")
    return engine


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None,
                    vocab_size: int) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    def given(value: float | None, default: float) -> float:
        return default if value is None else value

    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=given(body.top_p, 1.0), top_k=max(body.top_k or 0, 0),
            min_p=given(body.min_p, 0.0),
            repetition_penalty=given(body.repetition_penalty, 1.0),
            presence_penalty=given(body.presence_penalty, 0.0),
            frequency_penalty=given(body.frequency_penalty, 0.0),
            seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=bool(body.ignore_eos),
            logprobs=None if logprobs is None else min(logprobs, vocab_size),
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def check_prompt(prompt: Sequence[int], engine: InferenceEngine, param: str) -> None:
    window = engine.scheduler.max_seq_len  # the model's, --max-model-len and the cache's bound
    if not prompt:
        raise bad_request("the prompt is empty; give at least one token", param=param)
    if len(prompt) >= window:
        raise bad_request(f"the prompt has {len(prompt)} tokens but the context window is "
                          f"{window} tokens, leaving no room to generate; shorten it",
                          param=param, code="context_length_exceeded")


def start_generation(state: ServingState, engine: InferenceEngine, prompts: list[list[int]],
                     params: SamplingParams, n: int, param: str) -> WatchGroup:
    """Admit and submit `n` sequences per prompt (sample i of a seeded request uses seed + i,
    as `InferenceEngine.generate_ids` does)."""
    for prompt in prompts:
        check_prompt(prompt, engine, param)
    group = state.open_group(engine, len(prompts) * n)
    try:
        for prompt in prompts:
            for i in range(n):
                seeded = params if params.seed is None or i == 0 else dataclasses.replace(
                    params, seed=params.seed + i)
                group.submit(prompt, seeded)
    except ValueError as exc:
        group.close()
        raise bad_request(str(exc), param=param) from None
    except RuntimeError as exc:
        group.close()
        raise unavailable(f"the engine cannot take requests: {exc}", "engine_unavailable") from None
    except BaseException:
        group.close()
        raise
    return group


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


def raise_if_failed(group: WatchGroup, retry_after_s: int) -> None:
    for watch in group.watches:
        error = failure(watch.result, retry_after_s)
        if error is not None:
            raise error


def usage(prompts: list[list[int]], group: WatchGroup, n: int) -> dict[str, Any]:
    """Token counts: each prompt once (as OpenAI counts n > 1), every generated token id."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(w.result.generated_tokens for w in group.watches)
    cached = sum(w.result.cached_tokens for w in group.watches[::n])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def vocab_size(engine: InferenceEngine) -> int:
    return int(engine.model.config.vocab_size)


async def tokenize(fn: Callable[..., Any], *args: Any, size: int, **kwargs: Any) -> Any:
    """Run a tokenizer call; a big text goes to a worker thread so it never stalls the streams
    of other clients on the event loop."""
    if size > LARGE_TEXT:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)
