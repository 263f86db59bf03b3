"""The preprocessing progress bar: bytes read as the bar, tokens and tokens/s beside it."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn


class PrepareProgress(AbstractContextManager):
    def __init__(self, total_bytes: int, description: str, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()
        self.tokens = 0
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[tokens]:,} tokens"), TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
            transient=False)
        self.task = self.progress.add_task(description, total=total_bytes, tokens=0, rate="-")

    def advance(self, nbytes: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, advance=nbytes, tokens=self.tokens, rate=f"{rate:,.0f}")

    def __enter__(self) -> PrepareProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
