"""Warm-up, stable, decay (WSD): a constant peak rate for most of the run, then a short decay.

Short runs gain the most from it: the rate stays at its peak for longer than under a cosine,
and the final decay recovers the loss a high rate leaves on the table (Hu et al., "MiniCPM",
2024; Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations", 2024, which also finds a 1 - sqrt decay slightly better than a linear one).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from astrai_train.schedulers.base import BaseScheduler, warmup_factor
from astrai_train.schedulers.factory import SchedulerFactory

DEFAULT_DECAY_SHARE = 0.2  # of the run, when lr_decay_steps is not given


@SchedulerFactory.register("wsd")
class WSDScheduler(BaseScheduler):
    """factor(s) = (s + 1) / (warmup + 1) for s < warmup; 1 until the last `lr_decay_steps`
    steps of `total_steps`; then min_rate + (1 - min_rate) * (1 - sqrt(t)), t going 0 -> 1."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 1000,
                 lr_decay_steps: int | None = None, min_rate: float = 0.0,
                 last_epoch: int = -1) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if lr_decay_steps is None:
            lr_decay_steps = max(1, round(DEFAULT_DECAY_SHARE * total_steps))
        if not isinstance(lr_decay_steps, int) or lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps must be an integer >= 1, got {lr_decay_steps!r}")
        self.total_steps = total_steps
        self.lr_decay_steps = min(lr_decay_steps, max(total_steps - warmup_steps, 1))
        super().__init__(optimizer, warmup_steps, min_rate, last_epoch)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_factor(step, self.warmup_steps)
        decay_start = self.total_steps - self.lr_decay_steps
        if step < decay_start:
            return 1.0
        t = min((step - decay_start + 1) / self.lr_decay_steps, 1.0)
        return self.min_rate + (1.0 - self.min_rate) * (1.0 - math.sqrt(t))
