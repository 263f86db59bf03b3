"""`SchedulerFactory`: schedule name -> scheduler class."""

from __future__ import annotations

from typing import Any, ClassVar

from torch.optim import Optimizer

from astrai_core import BaseFactory, Registry
from astrai_train.schedulers.base import BaseScheduler


class SchedulerFactory(BaseFactory[BaseScheduler]):
    _registry: ClassVar[Registry] = Registry(kind="LR schedule")

    @classmethod
    def create(cls, optimizer: Optimizer, scheduler: str, **kwargs: Any) -> BaseScheduler:
        return cls._registry.get(scheduler)(optimizer, **kwargs)
