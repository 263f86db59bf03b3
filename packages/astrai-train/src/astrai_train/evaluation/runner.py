"""Run every task on every model: what `astrai eval` and the training callback call.

Tasks are checked and loaded first (missing files, unknown names, harness data not on this
machine fail before any model loads); then each model folder loads, runs every task, and is
released before the next one loads."""

from __future__ import annotations

import datetime
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from astrai_train.evaluation.models import (
    EvalModel,
    check_model_dir,
    column_names,
    load_eval_model,
)
from astrai_train.evaluation.progress import RequestProgress
from astrai_train.evaluation.results import EvalReport, ModelResult
from astrai_train.evaluation.tasks import EvalTask, TaskOptions, build_tasks


@dataclass
class EvalOptions:
    tasks: list[str] = field(default_factory=list)
    device: str | None = None
    dtype: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    seed: int = 0
    batch_size: int = 64
    max_tokens: int = 24
    scoring: str | None = None

    def task_options(self) -> TaskOptions:
        return TaskOptions(limit=self.limit, num_fewshot=self.num_fewshot, seed=self.seed,
                           batch_size=self.batch_size, max_tokens=self.max_tokens,
                           scoring=self.scoring)


def prepare_tasks(options: EvalOptions) -> list[EvalTask]:
    tasks = build_tasks(options.tasks, options.task_options())
    for task in tasks:
        task.prepare()
    return tasks


def evaluate_model(model: EvalModel, tasks: list[EvalTask], progress: RequestProgress
                   ) -> ModelResult:
    result = ModelResult(model.name, str(model.path) if model.path else None, info=model.info)
    progress.prefix = f"{model.name}: "
    for task in tasks:
        rows, raw, seconds = task.run(model, progress)
        result.scores += rows
        result.raw.update(raw)
        result.seconds.update(seconds)
    return result


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("astrai-core", "astrai-data", "astrai-train", "astrai-serve", "lm-eval"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def settings(options: EvalOptions, model_dirs: list[Path]) -> dict[str, Any]:
    from astrai_core.capability import describe
    from astrai_train.evaluation.models import resolve_device, resolve_dtype

    device = resolve_device(options.device)
    return {**asdict(options), "device": device, "dtype": resolve_dtype(options.dtype, device)
            or "stored", "models": [str(p) for p in model_dirs],
            "hardware": describe(device), "threads": torch.get_num_threads(),
            "versions": _versions(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def run_eval(model_dirs: list[Path], options: EvalOptions, progress: RequestProgress
             ) -> EvalReport:
    if not model_dirs:
        raise ValueError("name at least one model folder")
    for path in model_dirs:
        check_model_dir(path)
    tasks = prepare_tasks(options)
    started = time.perf_counter()
    results = []
    for path, name in zip(model_dirs, column_names(model_dirs), strict=True):
        model = load_eval_model(path, options.device, options.dtype, name)
        results.append(evaluate_model(model, tasks, progress))
        del model  # one model in memory at a time
    report = EvalReport(results, settings(options, model_dirs))
    report.settings["seconds"] = time.perf_counter() - started
    return report
