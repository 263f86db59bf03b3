"""Learning-rate schedules, created by name through `SchedulerFactory`."""

from astrai_train.schedulers.base import BaseScheduler
from astrai_train.schedulers.cosine import ConstantScheduler, CosineScheduler
from astrai_train.schedulers.factory import SchedulerFactory
from astrai_train.schedulers.sgdr import SGDRScheduler

__all__ = ["BaseScheduler", "ConstantScheduler", "CosineScheduler", "SGDRScheduler",
           "SchedulerFactory"]
