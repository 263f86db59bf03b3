"""`TrainContext`: the state of a run in progress, which the trainer and every callback see.
`TrainContextBuilder` (builder.py) makes one from a `TrainConfig` and optionally a checkpoint."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from astrai_core import Checkpoint
from astrai_data import ResumableDistributedSampler
from astrai_train.config import TrainConfig
from astrai_train.moe import ExpertBalancer
from astrai_train.parallel import full_model_state_dict, is_fsdp
from astrai_train.strategies import BaseStrategy


@dataclass
class TrainContext:
    """Everything about a run in progress. `iteration` counts optimizer updates; `loss`,
    `grad_norm` and `lr` describe the last one (the mean loss over its accumulation window, the
    gradient norm before clipping, the rate it used)."""

    config: TrainConfig
    model: nn.Module  # the module that runs forward (compiled / wrapped when asked)
    strategy: BaseStrategy
    dataloader: DataLoader
    sampler: ResumableDistributedSampler
    optimizer: Optimizer
    scheduler: LRScheduler | None
    device: torch.device
    total_steps: int
    loader_generator: torch.Generator
    raw_model: nn.Module  # the plain model: state dicts and checkpoints
    checkpoint: Checkpoint | None = None
    epoch: int = 0
    iteration: int = 0
    loss: float = math.nan
    grad_norm: float = math.nan
    lr: float = 0.0
    world_size: int = 1
    rank: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    step_tokens: int = 0  # real tokens in the last optimizer step
    step_grad_norm: torch.Tensor | None = None  # set before the update (pre-clip), then synced
    step_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # window means, unsynced
    autocast_dtype: torch.dtype | None = None
    reference_checksum: float | None = None
    stop_requested: str | None = None  # name of the signal that asked the run to stop
    stop_pending: str | None = None  # a signal seen here, not yet agreed by all processes
    last_checkpoint: Path | None = None
    moe: ExpertBalancer | None = None  # load balancing of a mixture-of-experts model

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights (gathered under FSDP: a collective, every rank calls it; only rank
        0 gets them). A `state_dict_fn` is called on every rank too (e.g. a TP gather)."""
        fn = self.config.state_dict_fn
        if fn is not None:
            return fn(self.raw_model)
        if is_fsdp(self.raw_model):
            return full_model_state_dict(self.raw_model)
        return self.raw_model.state_dict()

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0
