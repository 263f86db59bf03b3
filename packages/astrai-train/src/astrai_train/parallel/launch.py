"""`astrai train` across processes: spawned on this machine (`--nprocs N`) or started by
torchrun. Every process rebuilds the model and the dataset from the (picklable) launch options,
so nothing large crosses a process boundary; rank 0 reports the outcome."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from astrai_train.parallel.setup import get_rank, spawn_parallel_fn

if TYPE_CHECKING:
    from astrai_train.config import TrainConfig
    from astrai_train.context import TrainContext
    from astrai_train.launch import LaunchOptions


@dataclass
class RunSummary:
    """What the command prints at the end, from rank 0's TrainContext."""

    iteration: int
    loss: float
    last_checkpoint: str | None
    stop_requested: str | None

    @classmethod
    def of(cls, context: TrainContext) -> RunSummary:
        last = context.last_checkpoint
        return cls(context.iteration, context.loss, str(last) if last else None,
                   context.stop_requested)


def train_worker(opts: LaunchOptions, checkpoint_dir: str | None, summary_file: str) -> None:
    """One spawned process: build the run from the options and train its share."""
    from astrai_core import Checkpoint
    from astrai_train.launch import build_config
    from astrai_train.trainer import Trainer

    config = build_config(opts)
    checkpoint = Checkpoint.load(checkpoint_dir) if checkpoint_dir is not None else None
    context = Trainer(config).train(checkpoint)
    if get_rank() == 0:
        Path(summary_file).write_text(json.dumps(asdict(RunSummary.of(context))))


def train_spawned(opts: LaunchOptions, config: TrainConfig,
                  checkpoint_dir: Path | None) -> RunSummary:
    """Run `config.nprocs` processes on this machine; raises DistributedWorkerError naming the
    rank that failed."""
    with tempfile.TemporaryDirectory(prefix="astrai-train-") as tmp:
        summary_file = str(Path(tmp) / "summary.json")
        spawn_parallel_fn(train_worker, config.nprocs, opts,
                          str(checkpoint_dir) if checkpoint_dir is not None else None,
                          summary_file, backend=config.backend, master_addr=config.master_addr,
                          master_port=config.master_port, device_type=config.device,
                          timeout_s=config.dist_timeout_s)
        values: dict[str, Any] = json.loads(Path(summary_file).read_text())
    return RunSummary(**values)
