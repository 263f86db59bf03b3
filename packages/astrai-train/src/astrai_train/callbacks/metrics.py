"""Metric log: one JSON line per logged step, TensorBoard events when `tensorboard` is installed,
and a loss-curve PNG at the end when `matplotlib` is (both optional, imported only here)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from astrai_train.callbacks.base import TrainCallback
from astrai_train.callbacks.factory import CallbackFactory
from astrai_train.plots import plot_loss_curve

if TYPE_CHECKING:
    from astrai_train.context import TrainContext

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def tensorboard_writer(log_dir: Path) -> Any | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir / "tensorboard"))


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return records


@CallbackFactory.register("metric_logger")
class MetricLoggerCallback(TrainCallback):
    """Every `save_interval` steps appends {step, epoch, loss, lr, grad_norm, tokens,
    tokens_per_s, elapsed_s, <strategy metrics>} to `log_dir/metrics.jsonl`.

    On (re)start, lines after the starting step are dropped: a run killed after its last
    checkpoint logged steps that the resumed run repeats.
    """

    def __init__(self, log_dir: str | Path, save_interval: int = 10) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1 step, got {save_interval}")
        self.log_dir = Path(log_dir)
        self.save_interval = save_interval
        self.path = self.log_dir / METRICS_FILE
        self._writer: Any | None = None
        self._logged_step = -1
        self._start = time.perf_counter()
        self._mark = (0.0, 0)  # (time, tokens) at the previous log line

    def on_train_begin(self, context: TrainContext) -> None:
        if not context.is_main_process:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= context.iteration]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._writer = tensorboard_writer(self.log_dir)
        self._start = time.perf_counter()
        self._mark = (self._start, context.tokens_seen)
        self._logged_step = context.iteration

    def on_step_end(self, context: TrainContext) -> None:
        if context.is_main_process and context.iteration % self.save_interval == 0:
            self._log(context)

    def on_train_end(self, context: TrainContext) -> None:
        if not context.is_main_process:
            return
        if self._logged_step != context.iteration:
            self._log(context)
        self._close()
        records = [r for r in read_records(self.path) if "loss" in r]
        if records:
            plot_loss_curve(records, self.log_dir / LOSS_PLOT)

    def on_error(self, context: TrainContext) -> None:
        self._close()

    def record(self, context: TrainContext) -> dict[str, Any]:
        now = time.perf_counter()
        t_prev, tokens_prev = self._mark
        self._mark = (now, context.tokens_seen)
        record = {"step": context.iteration, "epoch": context.epoch, "loss": context.loss,
                  "lr": context.lr, "grad_norm": context.grad_norm, "tokens": context.tokens_seen,
                  "tokens_per_s": (context.tokens_seen - tokens_prev) / max(now - t_prev, 1e-9),
                  "elapsed_s": now - self._start}
        # The one sync for strategy statistics, at logging time only; a metric with several
        # values (the MoE tokens per expert) is logged as a (nested) list.
        record.update({k: v.tolist() if isinstance(v, torch.Tensor) and v.numel() > 1 else float(v)
                       for k, v in context.step_metrics.items()})
        return record

    def _log(self, context: TrainContext) -> None:
        record = self.record(context)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and not isinstance(value, list):
                    self._writer.add_scalar(f"train/{key}", value, context.iteration)
        self._logged_step = context.iteration

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
