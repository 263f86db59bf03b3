"""What chat and text completions share before their answer takes shape: checking the model
name (the base or one of its LoRA adapters) and refused fields, turning a request into `SamplingParams`, tokenizing off the event loop,
and admitting and submitting its sequences (`reply.py` has the rest of the skeleton)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import Request

from astrai_serve.api.errors import APIError, bad_request, unavailable
from astrai_serve.api.schemas import SamplingFields, refused_fields
from astrai_serve.api.state import ServingState
from astrai_serve.engine import InferenceEngine
from astrai_serve.sampling import GrammarSpec, SamplingParams
from astrai_serve.scheduler import ContextLengthError
from astrai_serve.watch import WatchGroup

# Below this a temperature divides logits into overflow; it can only mean greedy (as in vLLM).
GREEDY_BELOW = 1e-5
LARGE_TEXT = 32_768  # characters; tokenizing more than this leaves the event loop
_SURROGATE = re.compile("[\ud800-\udfff]")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def serving_state(request: Request) -> ServingState:
    return request.app.state.serving


def check_request(state: ServingState, body: SamplingFields,
                  refused: Mapping[str, Callable[[Any], bool]]) -> InferenceEngine:
    """The engine, once the request may be served at all."""
    engine = state.ready_engine()
    served = state.model_names()
    if body.model is not None and body.model not in served:
        raise APIError(404, f"model '{body.model}' does not exist; this server serves "
                       f"{', '.join(repr(n) for n in served)}", param="model",
                       code="model_not_found")
    names = refused_fields(body.model_extra, refused)
    if names:
        raise bad_request(f"'{names[0]}' is not supported by this server; remove it",
                          param=names[0], code="unsupported_parameter")
    return engine


def requested_adapter(state: ServingState, body: SamplingFields) -> str | None:
    """The LoRA adapter a checked request names in `model`; None for the base model."""
    return None if body.model in (None, state.config.served_model_name) else body.model


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None,
                    vocab_size: int, grammar: GrammarSpec | None = None,
                    adapter: str | None = None) -> SamplingParams:
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
            grammar=grammar, adapter=adapter,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def check_prompts(prompts: Sequence[Sequence[int]], engine: InferenceEngine, param: str) -> None:
    """The scheduler's own check (`InferenceScheduler.check_prompt`) as a 400, for every prompt
    before any is submitted."""
    for prompt in prompts:
        try:
            engine.scheduler.check_prompt(prompt)
        except ContextLengthError as exc:
            raise bad_request(str(exc), param=param, code="context_length_exceeded") from None
        except ValueError as exc:
            raise bad_request(str(exc), param=param) from None


def token_budget(asked: int | None, prompts: Sequence[Sequence[int]], engine: InferenceEngine,
                 param: str, default: int | None = None) -> tuple[int, int | None]:
    """(max_tokens of each sequence, the limit to report in `usage` or None). `asked` beyond
    what the context window leaves after the longest prompt is lowered to that room, and the
    room is reported (`usage.completion_tokens_limit`), so a client sees the clamp instead of
    guessing; without `asked`, `default` (or the room) applies silently."""
    check_prompts(prompts, engine, param)
    room = engine.scheduler.max_seq_len - max(len(p) for p in prompts)  # >= 1 once checked
    if asked is None:
        return min(default, room) if default is not None else room, None
    return (room, room) if asked > room else (asked, None)


def check_text(value: Any, param: str) -> None:
    """400 for a lone surrogate anywhere in `value` (strings in nested lists and dicts): JSON
    can carry one (a "\\ud83d" escape without its other half) but it is not text, and the
    tokenizer could only say "TextInputSequence must be str"."""
    found = _lone_surrogate(value, param)
    if found is not None:
        where, index, char = found
        raise bad_request(
            f"{where} has a lone surrogate (U+{ord(char):04X}) at character {index}: it is half "
            "of a UTF-16 pair, not text; send the whole character (e.g. \\ud83d\\ude00 for "
            "one emoji) or remove it", param=where, code="invalid_text")


def _lone_surrogate(value: Any, where: str) -> tuple[str, int, str] | None:
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        return (where, match.start(), match.group()) if match else None
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}.{key}")
        if found is not None:
            return found
    return None


def start_generation(state: ServingState, engine: InferenceEngine, prompts: list[list[int]],
                     params: SamplingParams, n: int, param: str) -> WatchGroup:
    """Admit and submit `n` sequences per prompt (sample i as `params.for_sample(i)`)."""
    check_prompts(prompts, engine, param)
    group = state.open_group(engine, len(prompts) * n, "n" if n > 1 else param)
    try:
        for prompt in prompts:
            for i in range(n):
                group.submit(prompt, params.for_sample(i))
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


def vocab_size(engine: InferenceEngine) -> int:
    return int(engine.model.config.vocab_size)


async def tokenize(fn: Callable[..., Any], *args: Any, size: int, **kwargs: Any) -> Any:
    """Run a tokenizer call; a big text goes to a worker thread so it never stalls the streams
    of other clients on the event loop."""
    if size > LARGE_TEXT:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)
