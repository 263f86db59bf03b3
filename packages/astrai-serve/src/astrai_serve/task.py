"""`Task`: one request's state inside the scheduler, and `TaskStatus`.

A Task is the single owner of everything known about its request; only the step loop writes
it, through `append`, `finish` and `fail`. Callers read it through its `result`, a
`GenerateResult` view that holds no copy of any of it (see `GenerateResult` for why).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from astrai_serve.request import GenerateResult, TokenLogprob
from astrai_serve.sampling import SamplingParams, TokenMatcher
from astrai_serve.text_output import TextOutput


class TaskStatus(enum.Enum):
    PENDING = "pending"  # waiting for admission (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds pages; prefilling or decoding
    FINISHED = "finished"  # stopped by a stop token/string or a length limit
    ABORTED = "aborted"  # cancelled (client gone) or failed


@dataclass(eq=False)
class Task:
    task_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()  # token ids that end the output
    max_seq_len: int = 1 << 30  # context window: prompt + output never exceed it
    text: TextOutput | None = None  # set when the caller wants text (and for stop strings)
    generator: torch.Generator | None = None  # a seeded request's own random numbers
    matcher: TokenMatcher | None = None  # the grammar state of a constrained request
    adapter: int = 0  # the served LoRA adapter's id (astrai_serve.adapters), 0: the base model
    status: TaskStatus = TaskStatus.PENDING
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, if asked
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    admitted: bool = False
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"; set last
    error: BaseException | None = None  # what killed the engine, if it died
    result: GenerateResult = field(init=False, repr=False)  # the callers' view of this task

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        self.result = GenerateResult(self)

    @property
    def input_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def remaining(self) -> int:
        """Tokens to feed before the next one can be sampled (1 while decoding)."""
        return len(self.token_ids) - self.num_computed

    @property
    def next_pos(self) -> int:
        """Position of the next token to feed: every token before it has its K/V cached."""
        return self.num_computed

    def is_finished(self, token_id: int) -> str | None:
        """Why the output ends after appending `token_id`, or None to go on."""
        if token_id in self.stop_ids:
            return "stop"
        if self.matcher is not None and self.matcher.done:
            return "stop"  # the grammar is complete: only a stop token could follow
        if self.text is not None and self.text.stopped:
            return "stop"
        if self.output_tokens >= self.params.max_tokens or len(self.token_ids) >= self.max_seq_len:
            return "length"
        return None

    # -- written by the step loop ------------------------------------------------------------
    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Add a sampled token (its logprob after it, then its text) and tell the readers."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.text is not None and token_id not in self.stop_ids:
            self.text.push(token_id)
        self.result.notify()

    def finish(self, reason: str, status: TaskStatus) -> None:
        """End the output: release the text held back, then set the reason (last, so a reader
        that sees it set sees everything else too)."""
        if self.text is not None:
            self.text.finish()
        self.status = status
        self.finish_time = time.perf_counter()
        self.finish_reason = reason
        self.result.notify()

    def fail(self, error: BaseException) -> None:
        """The engine died: the request ends with reason "abort" and `error`."""
        self.status = TaskStatus.ABORTED
        self.error = error
        self.finish_reason = "abort"
        self.result.notify()
