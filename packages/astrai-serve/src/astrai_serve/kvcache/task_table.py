"""`TaskTable`: each task's page table (logical page i -> physical page), how many of its
tokens came from the prefix cache, how many of its pages it has indexed there, and under which
prefix-cache namespace (the LoRA adapter its K/V are computed with)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

TaskId = Hashable


@dataclass(slots=True)
class _Row:
    pages: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens served by the prefix cache at admission
    recorded: int = 0  # leading pages already indexed by (or tried against) the prefix cache
    namespace: int = 0  # prefix-cache namespace: the served adapter id, 0 for the base


class TaskTable:
    def __init__(self) -> None:
        self._rows: dict[TaskId, _Row] = {}

    def __contains__(self, task_id: TaskId) -> bool:
        return task_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def task_ids(self) -> list[TaskId]:
        return list(self._rows)

    def set(self, task_id: TaskId, page_table: list[int], cached: int = 0, recorded: int = 0,
            namespace: int = 0) -> None:
        if task_id in self._rows:
            raise KeyError(f"task {task_id!r} already has a page table")
        self._rows[task_id] = _Row(page_table, cached, recorded, namespace)

    def get(self, task_id: TaskId) -> list[int]:
        """The live page list (appending to it extends the task)."""
        return self._rows[task_id].pages

    def get_cached(self, task_id: TaskId) -> int:
        return self._rows[task_id].cached

    def get_namespace(self, task_id: TaskId) -> int:
        return self._rows[task_id].namespace

    def get_recorded(self, task_id: TaskId) -> int:
        return self._rows[task_id].recorded

    def set_recorded(self, task_id: TaskId, n_pages: int) -> None:
        self._rows[task_id].recorded = n_pages

    def get_ref(self, task_id: TaskId) -> list[int]:
        """A copy of the page list, safe to keep."""
        return list(self._rows[task_id].pages)

    def pop(self, task_id: TaskId) -> tuple[list[int], int]:
        row = self._rows.pop(task_id)
        return row.pages, row.cached

    def table_tensor(
        self, task_ids: Sequence[TaskId], device: torch.device | str, width: int | None = None
    ) -> torch.Tensor:
        """(B, width) page tables, padded with page 0 (padding is always masked out)."""
        rows = [self._rows[t].pages for t in task_ids]
        width = width if width is not None else max((len(r) for r in rows), default=0)
        padded = [r[:width] + [0] * (width - len(r[:width])) for r in rows]
        return torch.tensor(padded, dtype=torch.long, device=device).view(len(rows), width)
