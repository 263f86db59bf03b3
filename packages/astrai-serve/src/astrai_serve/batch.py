"""`ScheduledBatch`: what one engine step computes."""

from __future__ import annotations

from dataclasses import dataclass, field

from astrai_serve.task import Task


@dataclass
class ScheduledBatch:
    decode: list[Task] = field(default_factory=list)  # one new token each, one shared forward
    prefill: list[tuple[Task, int, bool]] = field(default_factory=list)  # (task, tokens, samples)
    preempted: list[Task] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set)

    def add(self, task: Task, n_tokens: int) -> None:
        """Schedule `n_tokens` more tokens of `task` (call before its `num_computed` moves)."""
        if task.remaining == 1:
            self.decode.append(task)
        else:
            self.prefill.append((task, n_tokens, task.num_computed + n_tokens == len(task.token_ids)))
        self._ids.add(task.task_id)

    def __contains__(self, task: Task) -> bool:
        return task.task_id in self._ids

    @property
    def empty(self) -> bool:
        return not self._ids

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n, _ in self.prefill)

    def scheduled(self) -> list[tuple[Task, int]]:
        return [(t, 1) for t in self.decode] + [(t, n) for t, n, _ in self.prefill]

    def sampling_tasks(self) -> list[Task]:
        """Tasks that get a new token this step, in the order of the model runner's logit rows:
        the decode rows, then prefills whose chunk reaches the end of their tokens."""
        return self.decode + [t for t, _, samples in self.prefill if samples]
