"""What callers send (`GenerationRequest`) and what they get back (`GenerateResult`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from astrai_serve.sampling import SamplingParams


@dataclass
class GenerationRequest:
    """A chat request: messages go through the tokenizer's chat template."""

    messages: list[dict[str, Any]]
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    max_tokens: int | None = None  # None: the engine's default
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other SamplingParams field

    def __post_init__(self) -> None:
        if not self.messages or not all(isinstance(m, dict) and "role" in m for m in self.messages):
            raise ValueError("GenerationRequest.messages must be a non-empty list of "
                             "{'role': ..., 'content': ...} dicts")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            stop=list(self.stop), seed=self.seed, **self.extra,
        )


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely tokens, best first


class GenerateResult:
    """One request's output. The engine's step loop fills it; any thread (or, through
    `add_listener`, an asyncio loop) reads it. Finished means `finish_reason` is set."""

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.error: BaseException | None = None
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self._pieces: list[str] = []  # text not yet popped by a streaming reader
        self._cond = threading.Condition()
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return (f"GenerateResult({self.request_id!r}, finish_reason={self.finish_reason!r}, "
                f"prompt={self.prompt_tokens}, cached={self.cached_tokens}, "
                f"generated={self.generated_tokens}, text={self.text[:40]!r})")

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # -- written by the step loop ---------------------------------------------------------
    def append(self, token_id: int, piece: str = "", logprob: TokenLogprob | None = None) -> None:
        with self._cond:
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
            self.token_ids.append(token_id)
            if logprob is not None:
                self.logprobs.append(logprob)
            self._add_text(piece)
            if len(self.token_ids) == 1:
                self._cond.notify_all()
        self._notify()

    def finish(self, reason: str, cached_tokens: int, piece: str = "") -> None:
        with self._cond:
            self.cached_tokens = cached_tokens
            self._add_text(piece)
            self.finish_reason = reason
            self.finish_time = time.perf_counter()
            self._cond.notify_all()
        self._notify()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self.finish_reason = "abort"
            self._cond.notify_all()
        self._notify()

    def _add_text(self, piece: str) -> None:
        if piece:
            self.text += piece
            self._pieces.append(piece)
            self._cond.notify_all()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    # -- read by callers ---------------------------------------------------------------------
    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the step loop's thread) after every change."""
        self._listeners.append(callback)

    def pop_all(self) -> list[str]:
        """Text pieces that arrived since the last call."""
        with self._cond:
            pieces, self._pieces = self._pieces, []
            return pieces

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.finish_reason is not None, timeout)

    def wait_first_token(self, timeout: float | None = None) -> bool:
        """Block until a token arrives or the request finishes; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.token_ids) or self.finish_reason is not None,
                                       timeout)

    def wait_for_update(self, timeout: float | None = None) -> None:
        """Block until new text arrives or the request finishes."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._pieces) or self.finish_reason is not None, timeout)

    def wait_completion(self, timeout: float | None = None) -> GenerateResult:
        """Block until finished and return self; re-raises the engine's error if it failed."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"request {self.request_id} failed: {self.error}") from self.error
        return self

    def get_results(self) -> str:
        return self.text
