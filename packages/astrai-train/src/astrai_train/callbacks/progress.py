"""Progress over optimizer steps: step count of the whole run, loss, learning rate, tokens/s,
elapsed time and ETA.

On a terminal it is a live rich bar. When the output is not a terminal (a log file, CI, a
notebook capturing stdout) a bar would be redrawn into the file and cut to 80 columns, so it
prints one plain line every few percent instead, the same fields in full.
"""

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

LOG_LINES = 20  # plain lines per run when the output is not a terminal


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@CallbackFactory.register("progress_bar")
class ProgressBarCallback(TrainCallback):
    def __init__(self, num_epoch: int = 1, console: Console | None = None,
                 description: str = "train") -> None:
        self.num_epoch = num_epoch
        self.console = console or Console()
        self.description = description
        self._progress: Progress | None = None
        self._task = None
        self._t0 = 0.0
        self._tokens0 = 0
        self._start_step = 0
        self._last_line = -1

    def on_train_begin(self, context: TrainContext) -> None:
        if not context.is_main_process:
            return
        self._t0, self._tokens0 = time.perf_counter(), context.tokens_seen
        self._start_step = context.iteration
        if not self.console.is_terminal:
            return  # plain lines, from on_step_end
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            # Steps take seconds: a slow refresh costs the training threads almost nothing.
            console=self.console, transient=False, refresh_per_second=2)
        self._task = self._progress.add_task(
            self._label(context), total=context.total_steps, completed=context.iteration,
            loss="-", lr="-", tps="-")
        self._progress.start()

    def _label(self, context: TrainContext) -> str:
        # The epoch counter only means something when epochs, not max_steps, end the run.
        bounded = context.config.max_steps is not None and context.config.max_steps <= context.total_steps
        if self.num_epoch > 1 and not bounded:
            return f"{self.description} epoch {context.epoch + 1}/{self.num_epoch}"
        return self.description

    def on_epoch_begin(self, context: TrainContext) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=self._label(context))

    def on_step_end(self, context: TrainContext) -> None:
        if not context.is_main_process:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps = (context.tokens_seen - self._tokens0) / elapsed
        if self._progress is not None:
            self._progress.update(self._task, completed=context.iteration,
                                  loss=f"{context.loss:.4f}", lr=f"{context.lr:.2e}",
                                  tps=f"{tps:,.0f}")
            return
        total, done = max(context.total_steps, 1), context.iteration
        line = (done * LOG_LINES) // total
        if line == self._last_line and done < total:
            return
        self._last_line = line
        steps_done = max(done - self._start_step, 1)
        eta = elapsed / steps_done * max(total - done, 0)
        self.console.print(
            f"{self._label(context)} step {done}/{total} ({100 * done / total:.0f}%)  "
            f"loss {context.loss:.4f}  lr {context.lr:.2e}  {tps:,.0f} tok/s  "
            f"elapsed {clock(elapsed)}  ETA {clock(eta)}", highlight=False, soft_wrap=True)

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
