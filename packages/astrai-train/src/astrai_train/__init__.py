"""astrai-train: the Trainer, SEQ/SFT/DPO/GRPO strategies, LR schedules, callbacks and exact
checkpoint/resume."""

from importlib.metadata import version as _version

from astrai_train.builder import TrainContextBuilder
from astrai_train.callbacks import (
    CallbackFactory,
    CheckpointCallback,
    GradientClippingCallback,
    MetricLoggerCallback,
    ProgressBarCallback,
    SchedulerCallback,
    TrainCallback,
)
from astrai_train.config import TrainConfig
from astrai_train.context import TrainContext
from astrai_train.parallel import (
    ColumnParallelLinear,
    DistributedWorkerError,
    ParallelModel,
    RowParallelLinear,
    get_current_device,
    get_rank,
    get_world_size,
    setup_parallel,
    spawn_parallel_fn,
)
from astrai_train.resume import find_latest_checkpoint
from astrai_train.schedulers import (
    BaseScheduler,
    ConstantScheduler,
    CosineScheduler,
    SchedulerFactory,
    SGDRScheduler,
)
from astrai_train.strategies import (
    BaseStrategy,
    DPOStrategy,
    GRPOStrategy,
    RolloutSource,
    SEQStrategy,
    SFTStrategy,
    StrategyFactory,
)
from astrai_train.trainer import NonFiniteLossError, Trainer

__version__ = _version("astrai-train")

__all__ = [
    "BaseScheduler", "BaseStrategy", "CallbackFactory", "CheckpointCallback",
    "ColumnParallelLinear", "ConstantScheduler", "CosineScheduler", "DPOStrategy",
    "DistributedWorkerError", "GRPOStrategy", "GradientClippingCallback",
    "MetricLoggerCallback", "NonFiniteLossError", "ParallelModel", "ProgressBarCallback",
    "RolloutSource", "RowParallelLinear", "SEQStrategy", "SFTStrategy", "SGDRScheduler",
    "SchedulerCallback", "SchedulerFactory", "StrategyFactory", "TrainCallback", "TrainConfig",
    "TrainContext", "TrainContextBuilder", "Trainer", "find_latest_checkpoint",
    "get_current_device", "get_rank", "get_world_size", "setup_parallel", "spawn_parallel_fn",
]
