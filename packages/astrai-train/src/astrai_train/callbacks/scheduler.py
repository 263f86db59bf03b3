"""Steps the learning-rate schedule once per optimizer update."""

from __future__ import annotations

from typing import TYPE_CHECKING

from astrai_train.callbacks.base import TrainCallback
from astrai_train.callbacks.factory import CallbackFactory

if TYPE_CHECKING:
    from astrai_train.context import TrainContext


@CallbackFactory.register("scheduler")
class SchedulerCallback(TrainCallback):
    def on_train_begin(self, context: TrainContext) -> None:
        context.lr = float(context.optimizer.param_groups[0]["lr"])

    def on_step_end(self, context: TrainContext) -> None:
        # After optimizer.step(): the rate of update N+1 is factor(N).
        if context.scheduler is not None:
            context.scheduler.step()
