"""The three kinds of `astrai eval` task, by name in `EvalTaskFactory`, and how a `--tasks` entry
picks one:

- `perplexity`: `ppl:FILE`, or an existing .txt / .jsonl / .h5 file: perplexity and bits per
  byte (`perplexity.py`);
- `heldout`: `heldout:FOLDER`, or an existing folder holding eval_sft.jsonl / eval_dpo.jsonl /
  eval_grpo.jsonl (a synthetic corpus, `astrai data synth`): the quickstart's held-out scores,
  the same functions its table uses (`heldout.py`);
- `harness`: anything else, an lm-evaluation-harness task or group name (mmlu, ceval-valid,
  cmmlu, hellaswag, arc_easy, gsm8k, ...) or a task YAML file (`harness.py`). All harness
  entries of one run load together and run as one harness evaluation per model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from astrai_core import BaseFactory, Registry
from astrai_train.evaluation.harness import HarnessTasks
from astrai_train.evaluation.heldout import LANGS, HeldOutSet, score_model
from astrai_train.evaluation.models import EvalModel
from astrai_train.evaluation.perplexity import SUFFIXES, PerplexityTask
from astrai_train.evaluation.progress import RequestProgress
from astrai_train.evaluation.results import ScoreRow

HELDOUT_FILES = ("eval_sft.jsonl", "eval_dpo.jsonl", "eval_grpo.jsonl")
HELDOUT_REWARDS = "exact_answer,format"  # the quickstart's


class EvalTask(Protocol):
    kind: str

    @property
    def name(self) -> str: ...

    def prepare(self) -> None:
        """Check (and load) what the task needs before any model loads: fail fast."""

    def run(self, model: EvalModel, progress: RequestProgress
            ) -> tuple[list[ScoreRow], dict[str, Any], dict[str, float]]:
        """-> (table rows, everything reported, seconds per task)."""


@dataclass
class TaskOptions:
    limit: int | None = None  # records per task (harness: docs; heldout: per language)
    num_fewshot: int | None = None
    seed: int = 0
    batch_size: int = 64
    max_tokens: int = 24  # held-out replies
    scoring: str | None = None  # harness loglikelihood: engine or model


class EvalTaskFactory(BaseFactory[EvalTask]):
    _registry: ClassVar[Registry] = Registry(kind="eval task kind")


@EvalTaskFactory.register("heldout")
class HeldOutTask:
    kind = "heldout"

    def __init__(self, folder: Path, options: TaskOptions) -> None:
        self.folder, self.options = folder, options

    @property
    def name(self) -> str:
        return "heldout"

    def prepare(self) -> None:
        if not self.folder.is_dir():
            raise FileNotFoundError(f"--tasks heldout:{self.folder}: folder not found")
        if not any((self.folder / f).is_file() for f in HELDOUT_FILES):
            raise FileNotFoundError(f"--tasks heldout:{self.folder}: none of "
                                    f"{', '.join(HELDOUT_FILES)} there; make them with "
                                    "`astrai data synth`")

    def run(self, model: EvalModel, progress: RequestProgress
            ) -> tuple[list[ScoreRow], dict[str, Any], dict[str, float]]:
        from astrai_train.rl.rewards import build_reward

        start = time.perf_counter()
        data = HeldOutSet.load(self.folder, self.options.limit)
        was_training = model.model.training
        model.model.eval()
        try:
            scores = score_model(model.name, model.model, model.tokenizer, data,
                                 build_reward(HELDOUT_REWARDS), self.options.max_tokens)
        finally:
            model.model.train(was_training)
        counts = {"loss": data.chats, "accuracy": data.chats, "preference": data.pairs,
                  "reward": data.prompts}
        rows = []
        for metric in ("loss", "accuracy", "preference", "reward"):
            for lang, value in getattr(scores, metric).items():
                n = sum(1 for r in counts[metric] if r.get("lang") == lang)
                rows.append(ScoreRow(self.name, metric, lang, value, None, n))
        for lang in LANGS:
            for task, value in scores.tasks.get(lang, {}).items():
                rows.append(ScoreRow(self.name, f"accuracy/{task}", lang, value))
        return rows, {self.name: scores.to_dict()}, {self.name: time.perf_counter() - start}


EvalTaskFactory.register("perplexity")(PerplexityTask)
EvalTaskFactory.register("harness")(HarnessTasks)


def task_kind(spec: str) -> tuple[str, str]:
    """A `--tasks` entry -> (kind, its argument)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("ppl", "perplexity"):
        return "perplexity", rest
    if sep and prefix == "heldout":
        return "heldout", rest
    path = Path(spec)
    if path.is_file() and path.suffix in SUFFIXES:
        return "perplexity", spec
    if path.is_dir() and any((path / f).is_file() for f in HELDOUT_FILES):
        return "heldout", spec
    return "harness", spec


def build_tasks(specs: list[str], options: TaskOptions) -> list[EvalTask]:
    """Tasks in the order asked; the harness entries as one task at the first one's place."""
    entries = [s.strip() for spec in specs for s in spec.split(",") if s.strip()]
    if not entries:
        raise ValueError("--tasks is empty; name at least one task (e.g. --tasks arc_easy, "
                         "--tasks ppl:text.jsonl, --tasks heldout:corpus/)")
    tasks: list[EvalTask] = []
    harness: list[str] = []
    for entry in entries:
        kind, arg = task_kind(entry)
        if kind == "harness":
            if not harness:
                tasks.append(None)  # type: ignore[arg-type]  # its place, filled below
            harness.append(arg)
        elif kind == "perplexity":
            tasks.append(EvalTaskFactory.create(kind, Path(arg)))
        else:
            tasks.append(EvalTaskFactory.create(kind, Path(arg), options))
    if harness:
        at = tasks.index(None)  # type: ignore[arg-type]
        tasks[at] = EvalTaskFactory.create(
            "harness", harness, limit=options.limit, num_fewshot=options.num_fewshot,
            seed=options.seed, batch_size=options.batch_size, scoring=options.scoring)
    return tasks
