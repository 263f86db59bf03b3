"""Evaluation during training (`--eval-every N --eval-tasks ...`): every N optimizer steps the
live model runs the tasks `astrai eval` runs, and the scores go into metrics.jsonl as one line,
{"step", "epoch", "eval/<task>/<metric>/<lang>": value, ...}, beside the loss lines.

The tasks are checked and loaded when training begins, so a missing file or an lm-eval task
without its data stops the run before its first step, not at step N. Only the main process
evaluates (the others wait at their next collective); FSDP shards the weights, so it is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from astrai_train.callbacks.base import TrainCallback
from astrai_train.callbacks.factory import CallbackFactory
from astrai_train.callbacks.metrics import METRICS_FILE

if TYPE_CHECKING:
    from astrai_train.context import TrainContext


def metric_key(task: str, metric: str, lang: str) -> str:
    return f"eval/{task}/{metric}/{lang}"


@CallbackFactory.register("evaluation")
class EvalCallback(TrainCallback):
    def __init__(self, tasks: str, every: int, log_dir: str | Path, tokenizer: str | None,
                 parallel: str = "auto", seed: int = 0) -> None:
        if every < 1:
            raise ValueError(f"--eval-every must be >= 1 step, got {every}")
        if tokenizer is None:
            raise ValueError("--eval-every needs the model's tokenizer: pass --tokenizer DIR "
                             "(or a --model folder holding tokenizer.json)")
        if parallel == "fsdp":
            raise ValueError("--eval-every evaluates the whole model on one process, which FSDP "
                             "shards; use --parallel ddp, or evaluate the checkpoints with "
                             "`astrai eval`")
        self.specs = [s.strip() for s in tasks.split(",") if s.strip()]
        self.every = every
        self.path = Path(log_dir) / METRICS_FILE
        self.tokenizer_dir = tokenizer
        self.seed = seed
        self._tasks: list[Any] = []
        self._tokenizer: Any = None

    def on_train_begin(self, context: TrainContext) -> None:
        if not context.is_main_process:
            return
        from astrai_core import AutoTokenizer
        from astrai_train.evaluation.runner import EvalOptions, prepare_tasks

        self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self._tasks = prepare_tasks(EvalOptions(tasks=self.specs, seed=self.seed))

    def on_step_end(self, context: TrainContext) -> None:
        if context.is_main_process and context.iteration % self.every == 0:
            self.log(context, self.evaluate(context))

    def evaluate(self, context: TrainContext) -> dict[str, float]:
        from astrai_train.evaluation.models import EvalModel
        from astrai_train.evaluation.progress import RequestProgress
        from astrai_train.evaluation.runner import evaluate_model

        model = context.raw_model
        was_training = model.training
        model.eval()
        try:
            result = evaluate_model(EvalModel(f"step_{context.iteration}", model,
                                              self._tokenizer), self._tasks,
                                    RequestProgress(enabled=False))
        finally:
            model.train(was_training)
        return {metric_key(*s.key): s.value for s in result.scores}

    def log(self, context: TrainContext, scores: dict[str, float]) -> None:
        record = {"step": context.iteration, "epoch": context.epoch, "time": time.time(), **scores}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
