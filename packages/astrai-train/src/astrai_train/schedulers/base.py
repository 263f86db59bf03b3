"""`BaseScheduler`: a learning-rate schedule as a closed-form factor of the step.

It is a `torch.optim.lr_scheduler.LRScheduler`, so it works wherever PyTorch schedulers do.
`last_epoch` counts optimizer steps: the rate used by update k (1-based) is
base_lr * lr_factor(k - 1). The state holds only the position; the shape of the schedule comes
from the constructor, so a resumed run continues the schedule it is configured with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

_STATE_KEYS = ("last_epoch", "base_lrs", "_step_count", "_last_lr")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up (step + 1) / (warmup_steps + 1): never 0, and 1 exactly when it ends."""
    return (step + 1) / (warmup_steps + 1)


class BaseScheduler(LRScheduler, ABC):
    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, min_rate: float = 0.0,
                 last_epoch: int = -1) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not 0.0 <= min_rate <= 1.0:
            raise ValueError(f"min_rate must be in [0, 1], got {min_rate!r}")
        self.warmup_steps = warmup_steps
        self.min_rate = min_rate
        super().__init__(optimizer, last_epoch)

    @abstractmethod
    def lr_factor(self, step: int) -> float:
        """Multiplier of the base rate after `step` optimizer steps."""

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {key: self.__dict__[key] for key in _STATE_KEYS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({key: state_dict[key] for key in _STATE_KEYS})
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
