"""Learning-rate schedules, created by name through `SchedulerFactory`."""

from astrai_train.schedulers.base import BaseScheduler
from astrai_train.schedulers.cosine import ConstantScheduler, CosineScheduler
from astrai_train.schedulers.factory import SchedulerFactory
from astrai_train.schedulers.sgdr import SGDRScheduler
from astrai_train.schedulers.wsd import WSDScheduler

__all__ = ["BaseScheduler", "ConstantScheduler", "CosineScheduler", "SGDRScheduler",
           "SchedulerFactory", "WSDScheduler"]
