"""`CallbackFactory`: callback name -> callback class."""

from __future__ import annotations

from typing import ClassVar

from astrai_core import BaseFactory, Registry
from astrai_train.callbacks.base import TrainCallback


class CallbackFactory(BaseFactory[TrainCallback]):
    _registry: ClassVar[Registry] = Registry(kind="callback")
