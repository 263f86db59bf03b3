"""SGDR (Loshchilov & Hutter): cosine cycles with warm restarts, each t_mult times longer."""

from __future__ import annotations

from torch.optim import Optimizer

from astrai_train.schedulers.base import BaseScheduler, warmup_factor
from astrai_train.schedulers.cosine import cosine_factor
from astrai_train.schedulers.factory import SchedulerFactory


def cycle_position(t: int, cycle_length: int, t_mult: int) -> tuple[int, int]:
    """Steps into the current cycle and that cycle's length, `t` steps after warm-up."""
    if t_mult == 1:
        return t % cycle_length, cycle_length
    length = cycle_length
    while t >= length:  # cycles grow geometrically: a handful of iterations
        t -= length
        length *= t_mult
    return t, length


@SchedulerFactory.register("sgdr")
class SGDRScheduler(BaseScheduler):
    """factor(s) = (s + 1) / (warmup + 1) for s < warmup; then, with t steps into a cycle of
    length L (cycle i has length cycle_length * t_mult**i),
    min_rate + (1 - min_rate) * (1 + cos(pi * t / L)) / 2: back to 1 at every restart."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, cycle_length: int = 1000,
                 min_rate: float = 0.1, t_mult: int = 1, last_epoch: int = -1) -> None:
        if not isinstance(cycle_length, int) or cycle_length < 1:
            raise ValueError(f"cycle_length must be an integer >= 1, got {cycle_length!r}")
        if not isinstance(t_mult, int) or t_mult < 1:
            raise ValueError(f"t_mult must be an integer >= 1, got {t_mult!r}")
        self.cycle_length = cycle_length
        self.t_mult = t_mult
        super().__init__(optimizer, warmup_steps, min_rate, last_epoch)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_factor(step, self.warmup_steps)
        t, length = cycle_position(step - self.warmup_steps, self.cycle_length, self.t_mult)
        return cosine_factor(t, length, self.min_rate)
