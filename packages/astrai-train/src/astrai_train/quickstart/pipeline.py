"""`run_quickstart`: corpus -> tokenizer -> pretrain -> SFT -> DPO -> online GRPO, each stage
evaluated on the held-out split, then sample chats and the servable `final` folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from astrai_core import AutoModel, AutoTokenizer
from astrai_train.parallel import get_current_device
from astrai_train.quickstart.config import STAGES, QuickstartConfig
from astrai_train.quickstart.evaluate import (
    StageMetrics,
    evaluate_stage,
    greedy_replies,
    read_jsonl,
)
from astrai_train.quickstart.report import (
    markdown_table,
    results_table,
    samples_table,
    times_table,
)
from astrai_train.quickstart.stages import make_corpus, make_dataset, make_tokenizer, train_stage
from astrai_train.resume import TOKENIZER_FILES
from astrai_train.rl import build_reward, require_serve

SETTINGS_FILE = "quickstart.json"
RESULTS_FILE = "results.json"
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES)
SAMPLES_PER_LANG = 3


@dataclass
class QuickstartResult:
    out: Path
    final: Path
    metrics: list[StageMetrics] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    compression: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"final": str(self.final), "metrics": [m.to_dict() for m in self.metrics],
                "seconds": self.seconds, "samples": self.samples,
                "tokenizer_chars_per_token": self.compression,
                "markdown_table": markdown_table(self.metrics)}


def check_settings(cfg: QuickstartConfig, overwrite: bool) -> None:
    """A re-run into the same --out continues it only with the same settings."""
    path = cfg.out / SETTINGS_FILE
    if overwrite and cfg.out.exists():
        shutil.rmtree(cfg.out)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != cfg.fingerprint():
            changed = sorted(k for k in saved.keys() | cfg.fingerprint().keys()
                             if saved.get(k) != cfg.fingerprint().get(k))
            raise FileExistsError(
                f"{cfg.out} holds a quickstart run with other settings ({', '.join(changed)}); "
                "pass --overwrite to start it again, or choose another --out")
    elif cfg.out.exists() and any(cfg.out.iterdir()):
        raise FileExistsError(f"{cfg.out} exists and is not a quickstart folder; choose another "
                              "--out, or pass --overwrite to replace it")
    cfg.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.fingerprint(), indent=2) + "\n")


class StageClock:
    """Times the named steps of the run and announces each one."""

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.total = console, total
        self.seconds: dict[str, float] = {}
        self.announced = 0

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.announced += 1
        self.console.rule(f"[bold]{self.announced}/{self.total} {name}[/]: {what}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def publish_final(checkpoint: Path, final: Path) -> Path:
    """Copy the model and tokenizer files (not the optimizer state) into `final`, atomically."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in MODEL_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_stage_model(checkpoint: Path) -> torch.nn.Module:
    return AutoModel.from_pretrained(checkpoint, dtype="float32").to(get_current_device())


def sample_chats(model: torch.nn.Module, tokenizer: Any, chats: list[dict[str, Any]],
                 max_new_tokens: int) -> list[dict[str, Any]]:
    picked = [c for lang in ("en", "zh") for c in [c for c in chats if c["lang"] == lang][:SAMPLES_PER_LANG]]
    replies = greedy_replies(model, tokenizer, [c["messages"][:-1] for c in picked], max_new_tokens)
    return [{"lang": c["lang"], "user": c["messages"][-2]["content"], "model": r,
             "reference": c["messages"][-1]["content"]} for c, r in zip(picked, replies, strict=True)]


def run_quickstart(cfg: QuickstartConfig, console: Console | None = None,
                   overwrite: bool = False) -> QuickstartResult:
    console = console or Console()
    require_serve()  # GRPO rollouts and evaluation generate through astrai-serve: fail first
    check_settings(cfg, overwrite)
    clock = StageClock(console, total=3 + len(STAGES) + 1)
    with clock.stage("corpus", f"synthetic bilingual corpus ({cfg.corpus_size} chats, seed {cfg.seed})"):
        corpus = make_corpus(cfg)
    with clock.stage("tokenizer", f"byte-level BPE, {cfg.vocab_size} tokens asked"):
        tok_dir, compression = make_tokenizer(cfg, corpus)
        console.print(f"characters per token: {compression}")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    with clock.stage("datasets", "tokenize the training files"):
        data = {s: make_dataset(cfg, cfg.plan(s), corpus, tok_dir) for s in STAGES}
    reward = build_reward(cfg.rewards)
    chats = read_jsonl(corpus / "eval_sft.jsonl", cfg.eval_limit)
    prompts = read_jsonl(corpus / "eval_grpo.jsonl", cfg.eval_limit)
    result = QuickstartResult(out=cfg.out, final=cfg.out / "final", compression=compression)
    previous: Path | None = None
    for name in STAGES:
        plan = cfg.plan(name)
        with clock.stage(name, f"{plan.strategy}, {plan.steps} steps of {plan.batch_size}"):
            previous = train_stage(cfg, plan, data[name], tok_dir, previous)
        start = time.perf_counter()
        model = load_stage_model(previous)
        metrics = evaluate_stage(name, model, tokenizer, chats, prompts, reward, cfg.max_new_tokens)
        result.metrics.append(metrics)
        clock.add("evaluation", time.perf_counter() - start)
        console.print(results_table(result.metrics[-1:]))
    assert previous is not None
    with clock.stage("final", "sample chats and the servable folder"):
        publish_final(previous, result.final)
        result.samples = sample_chats(model, tokenizer, chats, cfg.max_new_tokens)
    result.seconds = clock.seconds
    (cfg.out / RESULTS_FILE).write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    console.print(times_table(result.seconds))
    console.print(results_table(result.metrics))
    console.print(samples_table(result.samples))
    return result

