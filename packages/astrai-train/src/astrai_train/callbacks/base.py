"""`TrainCallback`: hooks the trainer calls, in this order for every optimizer step:

    on_train_begin
      on_epoch_begin
        on_batch_begin, on_batch_end        once per micro-batch (forward + backward)
        on_step_begin                       gradients of the window are complete, before the
                                            update (clipping; the pre-clip norm is recorded)
        on_step_end                         after the update: context.iteration is N, the
                                            weights are those after N updates
      on_epoch_end
    on_train_end                            also after a Ctrl-C/SIGTERM stop
    on_error                                when anything raises (then the error propagates)

Callbacks run in list order; the defaults put the scheduler before the logger and the
checkpoint, so a checkpoint at step N holds the schedule after N steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from astrai_train.context import TrainContext


class TrainCallback:
    def on_train_begin(self, context: TrainContext) -> None:
        pass

    def on_train_end(self, context: TrainContext) -> None:
        pass

    def on_epoch_begin(self, context: TrainContext) -> None:
        pass

    def on_epoch_end(self, context: TrainContext) -> None:
        pass

    def on_step_begin(self, context: TrainContext) -> None:
        pass

    def on_step_end(self, context: TrainContext) -> None:
        pass

    def on_batch_begin(self, context: TrainContext) -> None:
        pass

    def on_batch_end(self, context: TrainContext) -> None:
        pass

    def on_error(self, context: TrainContext) -> None:
        pass


HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
         "on_step_end", "on_batch_begin", "on_batch_end", "on_error")
