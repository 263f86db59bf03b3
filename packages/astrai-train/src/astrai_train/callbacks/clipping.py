"""Gradient clipping by global norm; records the norm before clipping."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.nn.utils import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

from astrai_train.callbacks.base import TrainCallback
from astrai_train.callbacks.factory import CallbackFactory
from astrai_train.parallel.wrap import tensor_parallel_grad_norm

if TYPE_CHECKING:
    from astrai_train.context import TrainContext


@CallbackFactory.register("gradient_clipping")
class GradientClippingCallback(TrainCallback):
    """Scale gradients so their global L2 norm is at most `max_grad_norm` (0: never clip, but
    still measure the norm, which the trainer checks and logs)."""

    def __init__(self, max_grad_norm: float = 1.0) -> None:
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm

    def on_step_begin(self, context: TrainContext) -> None:
        params = [p for p in context.raw_model.parameters() if p.grad is not None]
        if not params:
            return
        tp_norm = tensor_parallel_grad_norm(context.raw_model)
        if tp_norm is not None:  # sharded weights: the local norm would be wrong (and differ)
            if self.max_grad_norm > 0:
                clip_grads_with_norm_(params, self.max_grad_norm, tp_norm, foreach=True)
            context.step_grad_norm = tp_norm
        elif self.max_grad_norm > 0:
            # Returns the total norm computed before scaling: this step's pre-clip norm.
            context.step_grad_norm = clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            context.step_grad_norm = get_total_norm([p.grad for p in params], foreach=True)
