"""`Task`: one request's state inside the scheduler, and `TaskStatus`."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from astrai_serve.sampling import SamplingParams
from astrai_serve.text_output import TextOutput

if TYPE_CHECKING:
    from astrai_serve.request import GenerateResult


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
    max_len: int = 1 << 30  # context window: prompt + output never exceed it
    result: GenerateResult | None = None  # where output goes
    text: TextOutput | None = None  # set when the caller wants text (and for stop strings)
    status: TaskStatus = TaskStatus.PENDING
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    admitted: bool = False
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

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
        return self.num_computed

    def is_finished(self, token_id: int) -> str | None:
        """Why the output ends after appending `token_id`, or None to go on."""
        if token_id in self.stop_ids:
            return "stop"
        if self.text is not None and self.text.stopped:
            return "stop"
        if self.output_tokens >= self.params.max_tokens or len(self.token_ids) >= self.max_len:
            return "length"
        return None
