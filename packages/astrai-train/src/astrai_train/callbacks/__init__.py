"""Training callbacks, created by name through `CallbackFactory`."""

from astrai_train.callbacks.base import HOOKS, TrainCallback
from astrai_train.callbacks.checkpoint import CheckpointCallback
from astrai_train.callbacks.clipping import GradientClippingCallback
from astrai_train.callbacks.evaluation import EvalCallback
from astrai_train.callbacks.factory import CallbackFactory
from astrai_train.callbacks.metrics import MetricLoggerCallback
from astrai_train.callbacks.progress import ProgressBarCallback
from astrai_train.callbacks.scheduler import SchedulerCallback

__all__ = [
    "HOOKS", "CallbackFactory", "CheckpointCallback", "EvalCallback", "GradientClippingCallback",
    "MetricLoggerCallback", "ProgressBarCallback", "SchedulerCallback", "TrainCallback",
]
