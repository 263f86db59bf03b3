"""A rich progress bar over optimizer steps: loss, learning rate, tokens/s and ETA."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from astrai_train.callbacks.base import TrainCallback
from astrai_train.callbacks.factory import CallbackFactory

if TYPE_CHECKING:
    from astrai_train.context import TrainContext


@CallbackFactory.register("progress_bar")
class ProgressBarCallback(TrainCallback):
    def __init__(self, num_epoch: int = 1, console: Console | None = None) -> None:
        self.num_epoch = num_epoch
        self.console = console
        self._progress: Progress | None = None
        self._task = None
        self._t0 = 0.0
        self._tokens0 = 0

    def on_train_begin(self, context: TrainContext) -> None:
        if not context.is_main_process:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            # Steps take seconds: a slow refresh costs the training threads almost nothing.
            console=self.console, transient=False, refresh_per_second=2)
        self._task = self._progress.add_task(
            "train", total=context.total_steps, completed=context.iteration,
            loss="-", lr="-", tps="-")
        self._t0, self._tokens0 = time.perf_counter(), context.tokens_seen
        self._progress.start()

    def on_epoch_begin(self, context: TrainContext) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"epoch {context.epoch + 1}/{self.num_epoch}")

    def on_step_end(self, context: TrainContext) -> None:
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps = (context.tokens_seen - self._tokens0) / elapsed
        self._progress.update(self._task, completed=context.iteration, loss=f"{context.loss:.4f}",
                              lr=f"{context.lr:.2e}", tps=f"{tps:,.0f}")

    def on_epoch_end(self, context: TrainContext) -> None:
        if self._progress is not None:
            self._progress.refresh()

    def on_train_end(self, context: TrainContext) -> None:
        self._stop()

    def on_error(self, context: TrainContext) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
