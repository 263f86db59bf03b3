"""`run_quickstart`: corpus -> tokenizer -> pretrain -> SFT -> DPO -> online GRPO, each stage
evaluated on the held-out split (and the random initial weights before them), then sample
chats, the learning curves and the servable `final` folder."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from astrai_core import AutoModel, AutoTokenizer, atomic_dir, atomic_file
from astrai_train.callbacks.metrics import METRICS_FILE, read_records
from astrai_train.evaluation import HeldOutScores, HeldOutSet, greedy_replies, score_model
from astrai_train.launch import preset_model
from astrai_train.parallel import get_current_device
from astrai_train.plots import PLOT_HINT, plot_stage_curves
from astrai_train.quickstart.config import STAGES, QuickstartConfig
from astrai_train.quickstart.report import (
    markdown_table,
    results_table,
    samples_table,
    times_table,
)
from astrai_train.quickstart.stages import (
    make_corpus,
    make_dataset,
    make_on_policy_dataset,
    make_tokenizer,
    train_stage,
)
from astrai_train.resume import TOKENIZER_FILES
from astrai_train.rl import build_reward, require_serve

SETTINGS_FILE = "quickstart.json"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES)
SAMPLE_TASKS = ("arithmetic", "translate", "chat")  # the sample chats: one of each


@dataclass
class QuickstartResult:
    out: Path
    final: Path
    metrics: list[HeldOutScores] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    compression: dict[str, float] = field(default_factory=dict)
    curves: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"final": str(self.final), "metrics": [m.to_dict() for m in self.metrics],
                "seconds": self.seconds, "samples": self.samples,
                "tokenizer_chars_per_token": self.compression,
                "curves": str(self.curves) if self.curves else None,
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
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(cfg.fingerprint(), indent=2) + "\n")


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
    with atomic_dir(final) as tmp:
        for name in MODEL_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
    return final


def load_stage_model(checkpoint: Path) -> torch.nn.Module:
    return AutoModel.from_pretrained(checkpoint, dtype="float32").to(get_current_device())


def sample_chats(model: torch.nn.Module, tokenizer: Any, chats: list[dict[str, Any]],
                 max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy replies to a few held-out questions of different tasks, per language."""
    picked = []
    for lang in ("en", "zh"):
        for task in SAMPLE_TASKS:
            picked += [c for c in chats if c["lang"] == lang and c["task"] == task][:1]
    replies = greedy_replies(model, tokenizer, [c["messages"][:-1] for c in picked], max_new_tokens)
    return [{"lang": c["lang"], "user": c["messages"][-2]["content"], "model": r,
             "reference": c["messages"][-1]["content"]} for c, r in zip(picked, replies, strict=True)]


def stage_curves(cfg: QuickstartConfig) -> Path | None:
    """One PNG of every stage's loss (and GRPO's reward) per step, next to results.json."""
    logs = {name: read_records(cfg.out / name / "logs" / METRICS_FILE) for name in STAGES}
    path = cfg.out / CURVES_FILE
    return path if plot_stage_curves(logs, path, title="astrai quickstart") else None


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
        # a stage whose pairs come from the previous stage's model prepares them when it starts
        data = {s: make_dataset(cfg, cfg.plan(s), corpus, tok_dir) for s in STAGES
                if not cfg.plan(s).on_policy_samples}
    reward = build_reward(cfg.rewards)
    held_out = HeldOutSet.load(corpus, cfg.eval_limit)
    result = QuickstartResult(out=cfg.out, final=cfg.out / "final", compression=compression)
    beta = cfg.plan("dpo").values.get("dpo_beta", 0.1)

    def evaluate(stage: str, model: torch.nn.Module, reference_gaps: torch.Tensor | None,
                 generate: bool = True) -> None:
        start = time.perf_counter()
        scores = score_model(stage, model, tokenizer, held_out, reward, cfg.max_new_tokens,
                             beta=beta, generate=generate, reference_gaps=reference_gaps)
        result.metrics.append(scores)
        clock.add("evaluation", time.perf_counter() - start)
        console.print(results_table(result.metrics[-1:]))

    # The random weights pretraining starts from: where the held-out loss starts.
    evaluate("init", preset_model(cfg.preset, tok_dir, cfg.seed).eval(), None, generate=False)
    previous: Path | None = None
    # The SFT model is DPO's and GRPO's reference: its log-prob gaps on the held-out pairs,
    # scored in its own row, give the later stages' margins.
    reference_gaps: torch.Tensor | None = None
    model: torch.nn.Module | None = None  # the last stage's model, as evaluated
    for name in STAGES:
        plan = cfg.plan(name)
        with clock.stage(name, f"{plan.strategy}, {plan.steps} steps of {plan.batch_size}"):
            if plan.on_policy_samples:
                assert model is not None  # QuickstartConfig: never the first stage
                data[name], report = make_on_policy_dataset(cfg, plan, corpus, tok_dir, model,
                                                            tokenizer)
                if report is not None:
                    console.print(f"on-policy pairs from the {STAGES[STAGES.index(name) - 1]} "
                                  f"model: {report.summary()}")
            previous = train_stage(cfg, plan, data[name], tok_dir, previous)
        model = load_stage_model(previous)
        evaluate(name, model, reference_gaps)
        if name == "sft":
            reference_gaps = result.metrics[-1].pair_gaps
            result.metrics[-1].margin = dict.fromkeys(result.metrics[-1].preference, 0.0)
    assert previous is not None and model is not None
    with clock.stage("final", "sample chats, learning curves and the servable folder"):
        publish_final(previous, result.final)
        result.samples = sample_chats(model, tokenizer, held_out.chats, cfg.max_new_tokens)
        result.curves = stage_curves(cfg)
    result.seconds = clock.seconds
    with atomic_file(cfg.out / RESULTS_FILE) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    console.print(times_table(result.seconds))
    console.print(results_table(result.metrics))
    console.print(samples_table(result.samples))
    if result.curves is not None:
        console.print(f"learning curves: {result.curves}")
    else:
        console.print(f"learning curves: not drawn; {PLOT_HINT}")
    return result
