"""`StrategyFactory`: strategy -> strategy class."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from astrai_core import BaseFactory, Registry
from astrai_train.strategies.base import BaseStrategy


class StrategyFactory(BaseFactory[BaseStrategy]):
    _registry: ClassVar[Registry] = Registry(kind="training strategy")

    @classmethod
    def create(cls, model: nn.Module, strategy: str, device: str | torch.device = "cpu",
               **kwargs: Any) -> BaseStrategy:
        return cls._registry.get(strategy)(model, device, **kwargs)
