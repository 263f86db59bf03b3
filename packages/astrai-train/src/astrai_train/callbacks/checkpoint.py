"""Periodic and final checkpoints, written atomically, keeping the newest K."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from astrai_core import remove_stale_temps
from astrai_train.callbacks.base import TrainCallback
from astrai_train.callbacks.factory import CallbackFactory
from astrai_train.resume import (
    build_checkpoint,
    checkpoint_name,
    find_latest_checkpoint,
    prune_checkpoints,
)

if TYPE_CHECKING:
    from astrai_train.context import TrainContext


@CallbackFactory.register("checkpoint")
class CheckpointCallback(TrainCallback):
    """Writes `save_dir/step_XXXXXXXX` every `interval` optimizer steps and when training ends
    (also after Ctrl-C/SIGTERM), then deletes all but the newest `keep_last` (0 keeps all).

    Nothing is written on an error: the state mid-window is not a step boundary, and after a
    non-finite loss the newest checkpoint is the last good one, which must stay as it is.
    """

    def __init__(self, save_dir: str | Path, interval: int = 1000, keep_last: int = 3) -> None:
        if interval < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {interval}")
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.save_dir = Path(save_dir)
        self.interval = interval
        self.keep_last = keep_last
        self._saved_step: int | None = None

    def on_train_begin(self, context: TrainContext) -> None:
        if context.is_main_process:
            remove_stale_temps(self.save_dir)  # of killed runs; a live writer's stay
        context.last_checkpoint = find_latest_checkpoint(self.save_dir)
        self._saved_step = context.iteration if context.checkpoint is not None else None

    def on_step_end(self, context: TrainContext) -> None:
        if context.iteration % self.interval == 0:
            self._save_checkpoint(context)

    def on_train_end(self, context: TrainContext) -> None:
        if context.iteration > 0 and self._saved_step != context.iteration:
            self._save_checkpoint(context)

    def on_error(self, context: TrainContext) -> None:
        """Deliberately writes nothing (see the class docstring): resuming goes back to
        `context.last_checkpoint`, which the error message names."""

    def _save_checkpoint(self, context: TrainContext) -> Path | None:
        self._saved_step = context.iteration
        checkpoint = build_checkpoint(context)  # every rank: FSDP gathers the shards to rank 0
        if checkpoint is None:  # not rank 0: only the main process writes
            return None
        path = checkpoint.save(self.save_dir / checkpoint_name(context.iteration))
        context.last_checkpoint = path
        prune_checkpoints(self.save_dir, self.keep_last)
        return path
