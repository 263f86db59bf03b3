"""What callers send (`GenerationRequest`) and what they get back (`GenerateResult`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from astrai_serve.sampling import SamplingParams

if TYPE_CHECKING:
    from astrai_serve.task import Task


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
    """One request as its caller sees it: a thread-safe, read-only view of its `Task`.

    Who owns what. The `Task` owns every fact of the request: prompt and output token ids,
    logprobs, text (through its `TextOutput`), cached tokens, arrival / first-token / finish
    times, finish reason and error, all written by the step loop alone. This view stores none
    of them; it adds only what readers need: a condition to wait on, listeners, and the
    offset a streaming reader has popped up to.

    Why this way round: the step loop needs prompt and output as one list (it feeds, hashes
    and, after a preemption, recomputes them together), so the tokens must live in the Task.
    A result holding its own copy cost an append under a lock per token and could disagree
    with the Task; this view costs one `notify()` per token and cannot disagree.

    Reading from another thread is safe without a lock: the step loop only appends to lists,
    replaces immutable values, and sets `finish_reason` last, so once `done` is True
    everything is in. `wait`, `wait_first_token` and `wait_for_update` block on the
    condition that `notify()` signals.
    """

    def __init__(self, task: Task) -> None:
        self._task = task
        self._cond = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self._popped = 0  # characters of `text` already handed out by `pop_all`

    def __repr__(self) -> str:
        return (f"GenerateResult({self.request_id!r}, finish_reason={self.finish_reason!r}, "
                f"prompt={self.prompt_tokens}, cached={self.cached_tokens}, "
                f"generated={self.generated_tokens}, text={self.text[:40]!r})")

    # -- the task's facts, read through ------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self._task.task_id

    @property
    def prompt_tokens(self) -> int:
        return self._task.input_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served by the prefix cache when the request was first admitted."""
        return self._task.cached_tokens

    @property
    def generated_tokens(self) -> int:
        return self._task.output_tokens

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids (a copy; see `token_ids_since` to read only new ones)."""
        return self.token_ids_since(0)

    def token_ids_since(self, start: int) -> list[int]:
        """Generated token ids from the `start`-th on."""
        task = self._task
        return task.token_ids[len(task.prompt_ids) + start :]

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """One entry per generated token when logprobs were asked for (a copy)."""
        return self.logprobs_since(0)

    def logprobs_since(self, start: int) -> list[TokenLogprob]:
        return self._task.logprobs[start:]

    @property
    def text(self) -> str:
        """The text so far ("" unless text was asked for): never retracted, stop string cut."""
        out = self._task.text
        return out.released() if out is not None else ""

    @property
    def finish_reason(self) -> str | None:
        """ "stop", "length" or "abort"; None while running."""
        return self._task.finish_reason

    @property
    def error(self) -> BaseException | None:
        """What killed the engine, if it died during this request."""
        return self._task.error

    @property
    def arrival_time(self) -> float:
        return self._task.arrival_time

    @property
    def first_token_time(self) -> float | None:
        return self._task.first_token_time

    @property
    def finish_time(self) -> float | None:
        return self._task.finish_time

    @property
    def done(self) -> bool:
        return self._task.finish_reason is not None

    # -- signalled by the step loop ----------------------------------------------------------
    def notify(self) -> None:
        """The task changed: wake waiting threads and call the listeners (step-loop thread)."""
        with self._cond:
            self._cond.notify_all()
        for listener in self._listeners:
            listener()

    # -- read by callers ---------------------------------------------------------------------
    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the step loop's thread) after every change."""
        self._listeners = [*self._listeners, callback]  # a new list: notify() may be iterating

    def pop_all(self) -> list[str]:
        """The text that arrived since the last call, as one piece ([] if none)."""
        out = self._task.text
        if out is None:
            return []
        with self._cond:
            piece = out.released(self._popped)
            self._popped += len(piece)
        return [piece] if piece else []

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def wait_first_token(self, timeout: float | None = None) -> bool:
        """Block until a token arrives or the request finishes; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.generated_tokens > 0 or self.done, timeout)

    def wait_for_update(self, timeout: float | None = None) -> None:
        """Block until new text arrives or the request finishes."""
        with self._cond:
            self._cond.wait_for(lambda: self._unpopped() or self.done, timeout)

    def _unpopped(self) -> bool:
        out = self._task.text
        return out is not None and out.n_released > self._popped

    def wait_completion(self, timeout: float | None = None) -> GenerateResult:
        """Block until finished and return self; re-raises the engine's error if it failed."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"request {self.request_id} failed: {self.error}") from self.error
        return self

    def get_results(self) -> str:
        """The output text (the seed's name for `text`)."""
        return self.text
