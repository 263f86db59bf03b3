"""`synthesize`: write the synthetic corpus files into a folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from astrai_data.synth import corpus
from astrai_data.synth.rewards import CANONICAL
from astrai_data.synth.tasks import LANGS

DEFAULT_SIZE = 2000


@dataclass(frozen=True)
class SynthPlan:
    """Records per file for a --size: SFT chats = size, the other files scale with it."""

    pretrain: int
    sft: int
    dpo: int
    grpo: int
    eval_pretrain: int
    eval_sft: int
    eval_grpo: int

    @classmethod
    def from_size(cls, size: int) -> SynthPlan:
        if size < 1:
            raise ValueError(f"--size must be a positive number of records, got {size}")
        return cls(pretrain=4 * size, sft=size, dpo=max(size // 2, 1), grpo=max(size // 2, 1),
                   eval_pretrain=max(size // 20, 10), eval_sft=max(size // 10, 20),
                   eval_grpo=max(size // 10, 20))


@dataclass
class SynthReport:
    out_dir: Path
    seed: int
    size: int
    records: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)


def _files(plan: SynthPlan) -> dict[str, tuple[int, Callable[[Random], Any]]]:
    return {
        "pretrain.jsonl": (plan.pretrain, lambda r: {"text": corpus.pretrain_doc(r)}),
        "sft.jsonl": (plan.sft, lambda r: {"messages": corpus.chat(r)}),
        "dpo.jsonl": (plan.dpo, corpus.preference),
        "grpo.jsonl": (plan.grpo, corpus.grpo_prompt),
        "eval_pretrain.jsonl": (plan.eval_pretrain,
                                lambda r: {"text": corpus.pretrain_doc(r, "eval")}),
        "eval_sft.jsonl": (plan.eval_sft, corpus.eval_chat),
        "eval_grpo.jsonl": (plan.eval_grpo, lambda r: corpus.grpo_prompt(r, "eval")),
    }


def _write_jsonl(path: Path, rows: Iterator[Any]) -> int:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


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


def synthesize(out_dir: str | Path, size: int = DEFAULT_SIZE, seed: int = 0) -> SynthReport:
    """Write the corpus files (and manifest.json) into `out_dir`; same seed and size, same bytes."""
    plan = SynthPlan.from_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = SynthReport(out_dir=out, seed=seed, size=size)
    for name, (count, make) in _files(plan).items():
        rng = Random(f"{seed}:{name}")  # one stream per file: files do not shift each other
        report.bytes[name] = _write_jsonl(out / name, (make(rng) for _ in range(count)))
        report.records[name] = count
    manifest = {"seed": seed, "size": size, "plan": asdict(plan), "records": report.records,
                "held_out": "numeric tasks hold out about 1 in 8 keys (stable hash); fact tasks "
                            "hold out question templates; eval_* files use only held-out prompts",
                "tasks": task_spec()}
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
                                       encoding="utf-8")
    return report
