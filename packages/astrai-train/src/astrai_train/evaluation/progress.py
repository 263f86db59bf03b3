"""Progress over evaluation requests: a live rich bar on a terminal; when the output is not a
terminal (a log file, CI), a few plain lines instead of a bar redrawn into the file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from astrai_train.evaluation.scoring import Advance

PLAIN_LINES = 4  # lines per tracked loop when the output is not a terminal


class RequestProgress:
    """`with progress.track("loglikelihood", total) as advance: ... advance(n)`."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.prefix = ""  # e.g. the model's name, set by the runner

    @contextmanager
    def track(self, description: str, total: int, unit: str = "requests") -> Iterator[Advance]:
        label = f"{self.prefix}{description}"
        if not self.enabled or total <= 0:
            yield lambda n: None
            return
        if self.console.is_terminal:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                          console=self.console, transient=True) as bar:
                task = bar.add_task(label, total=total)
                yield lambda n: bar.advance(task, n)
            return
        yield from self._plain(label, total, unit)

    def _plain(self, label: str, total: int, unit: str) -> Iterator[Advance]:
        start, done, shown = time.perf_counter(), 0, 0
        step = max(1, -(-total // PLAIN_LINES))

        def advance(n: int) -> None:
            nonlocal done, shown
            done = min(total, done + n)
            if done >= shown + step and done < total:
                shown = done - done % step
                self.console.print(f"{label}: {done}/{total} {unit}", highlight=False)

        yield advance
        self.console.print(f"{label}: {done}/{total} {unit} in "
                           f"{time.perf_counter() - start:.1f} s", highlight=False)
