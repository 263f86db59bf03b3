"""lm-evaluation-harness tasks (`mmlu`, `ceval-valid`, `cmmlu`, `hellaswag`, `arc_easy`, `gsm8k`,
or a task YAML over local files) on AstrAI models, through the `astrai` adapter.

Nothing is downloaded: the process runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, and a
task whose data is neither in the local Hugging Face cache nor on disk fails before any model
loads, with one line saying where to put it. lm-eval is an optional extra; without it these
tasks say how to install it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from astrai_train.evaluation.models import EvalModel
from astrai_train.evaluation.progress import RequestProgress
from astrai_train.evaluation.results import ALL, ScoreRow

INSTALL_HINT = "pip install 'astrai-train[eval]' (in this repository: uv sync)"
LANG_FIELDS = ("lang", "language")
# Tasks whose every record is in one language (prefix of the task name -> language).
TASK_LANGS = {"ceval": "zh", "cmmlu": "zh", "mmlu": "en", "hellaswag": "en", "arc_": "en",
              "gsm8k": "en"}


def require_lm_eval(specs: list[str]) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(f"--tasks {','.join(specs)}: lm-evaluation-harness tasks need the "
                          f"lm-eval package, which is not installed; install the eval extra: "
                          f"{INSTALL_HINT}") from None


def go_offline() -> None:
    """No network at run time, also for libraries imported before this call."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub

        hub.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        import datasets.config as ds

        ds.HF_HUB_OFFLINE = ds.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass


def _hf_home() -> str:
    try:
        import huggingface_hub.constants as hub

        return str(hub.HF_HOME)
    except ImportError:
        return os.environ.get("HF_HOME", "~/.cache/huggingface")


def _data_missing(spec: str, exc: BaseException) -> ValueError:
    quoted = re.findall(r"'([^'\s]+)'", str(exc))  # "Couldn't reach 'org/name' on the Hub"
    dataset = next((q for q in quoted if "/" in q), quoted[0] if quoted else None)
    what = f"its data set '{dataset}'" if dataset else "its data"
    fetch = (f"python -c \"import datasets; datasets.load_dataset('{dataset}')\""
             if dataset else "loading the task once")
    return ValueError(
        f"lm-eval task '{spec}': {what} is not on this machine ({type(exc).__name__}: "
        f"{str(exc)[:160]}), and astrai eval never downloads. Fetch it where there is network "
        f"({fetch}) and copy the Hugging Face cache to {_hf_home()} (or set HF_HOME to it), or "
        f"write a task YAML over local files (dataset_path: json, dataset_kwargs: "
        f"{{data_files: ...}})")


class HarnessTasks:
    """The lm-eval tasks of one `astrai eval` run: loaded (data included) once, before any
    model, then evaluated on each model."""

    kind = "harness"

    def __init__(self, specs: list[str], limit: int | None = None, num_fewshot: int | None = None,
                 seed: int = 0, batch_size: int = 64, scoring: str | None = None) -> None:
        self.specs = specs
        self.limit, self.num_fewshot, self.seed = limit, num_fewshot, seed
        self.batch_size, self.scoring = batch_size, scoring
        self._loaded: list[tuple[str, dict[str, Any]]] = []

    @property
    def name(self) -> str:
        return ",".join(self.specs)

    def prepare(self) -> None:
        require_lm_eval(self.specs)
        go_offline()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # our table is the report
        import datasets

        datasets.disable_progress_bars()  # our progress is over requests
        from lm_eval.tasks import TaskManager

        yaml_only = all(Path(s).suffix in (".yaml", ".yml") for s in self.specs)
        for spec in self.specs:
            if Path(spec).suffix in (".yaml", ".yml") and not Path(spec).is_file():
                raise FileNotFoundError(f"--tasks {spec}: task YAML not found")
        # Indexing lm-eval's ~200 built-in task folders takes seconds: skip it for YAML files.
        manager = TaskManager(include_defaults=not yaml_only)
        for spec in self.specs:
            try:
                loaded = manager.load([spec])
            except KeyError:
                raise ValueError(f"--tasks {spec}: not an lm-eval task, a task YAML, a text/"
                                 f"JSONL/HDF5 file (perplexity) or a corpus folder (heldout); "
                                 f"`lm-eval ls tasks` lists lm-eval's tasks") from None
            except OSError as exc:  # ConnectionError (offline), FileNotFoundError (not cached)
                raise _data_missing(spec, exc) from None
            self._configure(loaded)
            self._loaded.append((spec, loaded))

    def _configure(self, loaded: dict[str, Any]) -> None:
        """What lm-eval's simple_evaluate does before evaluating: few-shot count and seed."""
        for task in loaded["tasks"].values():
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=self.seed)

    def run(self, model: EvalModel, progress: RequestProgress) -> tuple[list[ScoreRow],
                                                                       dict[str, Any],
                                                                       dict[str, float]]:
        import random

        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate

        from astrai_train.evaluation.lm_eval_adapter import DEFAULT_SCORING, AstraiLM

        lm = AstraiLM(model=model.model, tokenizer=model.tokenizer, batch_size=self.batch_size,
                      scoring=self.scoring or DEFAULT_SCORING, progress=progress)
        rows: list[ScoreRow] = []
        raw: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        try:
            for spec, loaded in self._loaded:
                random.seed(self.seed)
                np.random.seed(self.seed)
                torch.manual_seed(self.seed)
                start = time.perf_counter()
                result = evaluate(lm=lm, task_dict=loaded, limit=self.limit, log_samples=True,
                                  bootstrap_iters=1000)
                seconds[spec] = time.perf_counter() - start
                rows += harness_rows(result, top_level(loaded))
                raw[spec] = {k: v for k, v in result.items() if k != "samples"}
        finally:
            lm.close()
        return rows, raw, seconds


def top_level(loaded: dict[str, Any]) -> list[str]:
    """The names a spec asked for: its outermost groups, else its tasks."""
    children = {c for names in loaded.get("group_map", {}).values() for c in names}
    groups = [g for g in loaded["groups"] if g not in children]
    return groups or list(loaded["tasks"])


def _metrics(entry: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    """lm-eval's "acc,none" / "acc_stderr,none" keys -> (metric, value, stderr)."""
    out = []
    for key, value in entry.items():
        metric, _, filt = key.partition(",")
        if not filt or "_stderr" in metric or not isinstance(value, int | float):
            continue
        stderr = entry.get(f"{metric}_stderr,{filt}")
        name = metric if filt == "none" else f"{metric} ({filt})"
        out.append((name, float(value), float(stderr) if isinstance(stderr, int | float) else None))
    return out


def task_lang(name: str) -> str:
    return next((lang for prefix, lang in TASK_LANGS.items() if name.startswith(prefix)), ALL)


def harness_rows(result: dict[str, Any], names: list[str]) -> list[ScoreRow]:
    """The table's rows of one spec: each asked task or group over all its records, and per
    language where its records carry a `lang` field."""
    rows = []
    tables = {**result.get("results", {}), **result.get("groups", {})}
    for name in names:
        entry = tables.get(name, {})
        n = result.get("n-samples", {}).get(name, {}).get("effective")
        for metric, value, stderr in _metrics(entry):
            rows.append(ScoreRow(name, metric, task_lang(name), value, stderr, n))
        rows += _per_language(name, result.get("samples", {}).get(name, []))
    return rows


def _per_language(task: str, samples: list[dict[str, Any]]) -> list[ScoreRow]:
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    for sample in samples:
        doc = sample.get("doc") or {}
        lang = next((doc[f] for f in LANG_FIELDS if isinstance(doc.get(f), str)), None)
        if lang is None:
            continue
        filt = sample.get("filter", "none")
        for metric in sample.get("metrics", []):
            value = sample.get(metric)
            if isinstance(value, int | float):
                name = metric if filt == "none" else f"{metric} ({filt})"
                sums[(name, lang)].append(float(value))
    return [ScoreRow(task, metric, lang, sum(v) / len(v), None, len(v))
            for (metric, lang), v in sorted(sums.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
