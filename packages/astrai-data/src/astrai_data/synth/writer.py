"""`synthesize`: write the synthetic corpus files into a folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from astrai_core import atomic_file
from astrai_data.synth import corpus
from astrai_data.synth.rewards import CANONICAL
from astrai_data.synth.tasks import LANGS

DEFAULT_SIZE = 2000


EVAL_PER_LANG = 300  # held-out items per language in each eval file: 5 points is not noise


@dataclass(frozen=True)
class SynthPlan:
    """Records per file for a --corpus-size: SFT chats = size, the other training files scale
    with it. The held-out files hold `eval_per_lang` distinct items per language whatever the
    size (fewer only where a task has fewer held-out questions)."""

    pretrain: int
    sft: int
    dpo: int
    grpo: int
    eval_pretrain: int
    eval_per_lang: int = EVAL_PER_LANG

    @classmethod
    def from_size(cls, size: int, eval_per_lang: int = EVAL_PER_LANG) -> SynthPlan:
        if size < 1:
            raise ValueError(f"--corpus-size must be a positive number of records, got {size}")
        if eval_per_lang < 1:
            raise ValueError(f"eval_per_lang must be >= 1, got {eval_per_lang}")
        return cls(pretrain=4 * size, sft=size, dpo=max(size // 2, 1), grpo=max(size // 2, 1),
                   eval_pretrain=max(size // 20, 10), eval_per_lang=eval_per_lang)


@dataclass
class SynthReport:
    out_dir: Path
    seed: int
    size: int
    records: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)


def _sampled(count: int, make: Callable[[Random], Any]) -> Callable[[Random], Iterable[Any]]:
    return lambda rng: (make(rng) for _ in range(count))


def _files(plan: SynthPlan, seed: int) -> dict[str, Callable[[Random], Iterable[Any]]]:
    """File name -> records, drawn from the file's own random stream (training files) or
    enumerated from the held-out questions (eval files)."""
    n = plan.eval_per_lang
    return {
        "pretrain.jsonl": _sampled(plan.pretrain, lambda r: {"text": corpus.pretrain_doc(r)}),
        "sft.jsonl": _sampled(plan.sft, lambda r: {"messages": corpus.chat(r)}),
        "dpo.jsonl": _sampled(plan.dpo, corpus.preference),
        "grpo.jsonl": _sampled(plan.grpo, corpus.grpo_prompt),
        "eval_pretrain.jsonl": _sampled(plan.eval_pretrain,
                                        lambda r: {"text": corpus.pretrain_doc(r, "eval")}),
        "eval_sft.jsonl": lambda r: corpus.eval_chats(seed, n),
        "eval_dpo.jsonl": lambda r: corpus.eval_preferences(seed, n),
        "eval_grpo.jsonl": lambda r: corpus.eval_prompts(seed, n),
    }


def _write_jsonl(path: Path, rows: Iterable[Any]) -> tuple[int, int]:
    """-> (bytes, records) written."""
    count = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return path.stat().st_size, count


def task_spec() -> dict[str, Any]:
    """What each task asks and answers (one example per language), for docs and the manifest."""
    spec: dict[str, Any] = {}
    for name, task in corpus.TASKS.items():
        rng = Random(name)
        key = task.sample_key(rng, "train")
        spec[name] = {
            "numeric": name in corpus.NUMERIC,
            "held_out": "keys" if task.holds_out_keys else "question templates",
            "examples": {lang: [task.prompt(key, lang, rng, "train"), task.reply(key, lang)]
                         for lang in LANGS},
        }
    spec["_reply_formats"] = {lang: [p.pattern for p in patterns]
                              for lang, patterns in CANONICAL.items()}
    return spec


def synthesize(out_dir: str | Path, size: int = DEFAULT_SIZE, seed: int = 0,
               eval_per_lang: int = EVAL_PER_LANG) -> SynthReport:
    """Write the corpus files (and manifest.json) into `out_dir`; same seed and size, same bytes."""
    plan = SynthPlan.from_size(size, eval_per_lang)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = SynthReport(out_dir=out, seed=seed, size=size)
    for name, records in _files(plan, seed).items():
        rng = Random(f"{seed}:{name}")  # one stream per file: files do not shift each other
        report.bytes[name], report.records[name] = _write_jsonl(out / name, records(rng))
    manifest = {"seed": seed, "size": size, "plan": asdict(plan), "records": report.records,
                "held_out": "numeric tasks hold out about 1 in 8 keys (stable hash); fact tasks "
                            "hold out question phrasings; eval_* files hold only held-out "
                            "questions, each once, spread evenly over the tasks per language",
                "tasks": task_spec()}
    with atomic_file(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report
