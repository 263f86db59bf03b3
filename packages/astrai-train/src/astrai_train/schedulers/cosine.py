"""Warm-up, one cosine decay to a floor, then the floor; and warm-up then a constant rate."""

from __future__ import annotations

import math

from torch.optim import Optimizer

from astrai_train.schedulers.base import BaseScheduler, warmup_factor
from astrai_train.schedulers.factory import SchedulerFactory


def cosine_factor(t: float, length: float, min_rate: float) -> float:
    """From 1 at t=0 down to min_rate at t=length along half a cosine."""
    progress = min(max(t / length, 0.0), 1.0)
    return min_rate + (1.0 - min_rate) * 0.5 * (1.0 + math.cos(math.pi * progress))


@SchedulerFactory.register("cosine")
class CosineScheduler(BaseScheduler):
    """factor(s) = (s + 1) / (warmup + 1) for s < warmup, then
    min_rate + (1 - min_rate) * (1 + cos(pi * min((s - warmup) / lr_decay_steps, 1))) / 2."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, lr_decay_steps: int = 1000,
                 min_rate: float = 0.1, last_epoch: int = -1) -> None:
        if not isinstance(lr_decay_steps, int) or lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps must be an integer >= 1, got {lr_decay_steps!r}")
        self.lr_decay_steps = lr_decay_steps
        super().__init__(optimizer, warmup_steps, min_rate, last_epoch)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_factor(step, self.warmup_steps)
        return cosine_factor(step - self.warmup_steps, self.lr_decay_steps, self.min_rate)


@SchedulerFactory.register("constant")
class ConstantScheduler(BaseScheduler):
    """Linear warm-up, then the base rate."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, last_epoch: int = -1) -> None:
        super().__init__(optimizer, warmup_steps, 1.0, last_epoch)

    def lr_factor(self, step: int) -> float:
        return warmup_factor(step, self.warmup_steps) if step < self.warmup_steps else 1.0
