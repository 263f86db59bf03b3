"""`EngineStats`: counters the step loop updates and `get_stats()` reports."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from astrai_serve.task import Task

WINDOW_S = 10.0  # throughput is measured over the last this many seconds


@dataclass
class EngineStats:
    steps: int = 0
    tokens_generated: int = 0
    tokens_computed: int = 0  # prompt, recomputed and decode tokens fed to the model
    requests_finished: int = 0
    prompt_tokens: int = 0  # of admitted requests
    cached_tokens: int = 0  # of admitted requests' prompt tokens, served by the prefix cache
    preemptions: int = 0
    busy_s: float = 0.0  # time spent running steps
    _recent: deque[tuple[float, int]] = field(default_factory=deque)  # (end time, tokens sampled)

    def record_step(self, computed: int, sampled: int, seconds: float) -> None:
        self.steps += 1
        self.tokens_computed += computed
        self.tokens_generated += sampled
        self.busy_s += seconds
        now = time.perf_counter()
        self._recent.append((now, sampled))
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()

    def record_admission(self, task: Task) -> None:
        self.prompt_tokens += task.input_tokens
        self.cached_tokens += task.cached_tokens

    def record_finish(self, task: Task) -> None:
        self.requests_finished += 1

    def throughput(self) -> float:
        """Generated tokens per second over the recent window (0 when idle)."""
        recent = list(self._recent)
        if not recent or recent[-1][0] < time.perf_counter() - WINDOW_S:
            return 0.0
        span = max(recent[-1][0] - recent[0][0], 1e-3)
        return sum(n for _, n in recent[1:]) / span if len(recent) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "tokens_computed": self.tokens_computed,
            "requests_finished": self.requests_finished,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefix_hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "preemptions": self.preemptions,
            "throughput_tokens_per_s": self.throughput(),
            "busy_s": self.busy_s,
        }
