"""The quickstart's stages as plain functions: corpus, tokenizer, dataset files, and one
training stage (any strategy) that starts from the previous stage's checkpoint.

Every stage writes into its own folder under --out and is skipped when a re-run finds it
complete, so an interrupted quickstart continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from astrai_core import Checkpoint
from astrai_core.tokenizer.training import train_tokenizer
from astrai_data import PrepareConfig, prepare, synthesize
from astrai_train.config import TrainConfig
from astrai_train.evaluation.heldout import read_jsonl
from astrai_train.launch import LaunchOptions, build_config, write_launch
from astrai_train.quickstart.config import QuickstartConfig, StagePlan
from astrai_train.resume import list_checkpoints
from astrai_train.rl.pairs import PairConfig, PairReport, on_policy_pairs, write_pairs
from astrai_train.trainer import Trainer

CORPUS_FILES = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "grpo.jsonl", "eval_pretrain.jsonl",
                "eval_sft.jsonl", "eval_grpo.jsonl")


def make_corpus(cfg: QuickstartConfig) -> Path:
    folder = cfg.out / "data"
    manifest = folder / "manifest.json"
    if manifest.is_file() and all((folder / name).is_file() for name in CORPUS_FILES):
        return folder  # written by an earlier run with the same settings (checked by the caller)
    synthesize(folder, size=cfg.corpus_size, seed=cfg.seed)
    return folder


def make_tokenizer(cfg: QuickstartConfig, corpus: Path) -> tuple[Path, dict[str, float]]:
    """Byte-level BPE on the training text only (pretraining documents and SFT chats)."""
    folder = cfg.out / "tokenizer"
    stats = folder / "quickstart_tokenizer.json"
    if stats.is_file() and (folder / "tokenizer.json").is_file():
        return folder, json.loads(stats.read_text())["compression"]
    report = train_tokenizer([corpus / "pretrain.jsonl", corpus / "sft.jsonl"], cfg.vocab_size,
                             folder, show_progress=cfg.progress, overwrite=True)
    stats.write_text(json.dumps({"vocab_size": report.vocab_size,
                                 "compression": report.compression}, indent=2) + "\n")
    return folder, report.compression


def make_dataset(cfg: QuickstartConfig, plan: StagePlan, corpus: Path, tokenizer: Path) -> Path:
    out = corpus / (Path(plan.data).stem + ".h5")
    if not out.is_file():  # prepare() writes atomically: a file that exists is complete
        # In-process encoding: on two cores, worker processes cost more than they save here.
        prepare(plan.strategy, [corpus / plan.data], out, tokenizer,
                PrepareConfig(num_workers=0), progress=cfg.progress)
    return out


def make_on_policy_dataset(cfg: QuickstartConfig, plan: StagePlan, corpus: Path, tokenizer: Path,
                           policy: nn.Module, tok: Any) -> tuple[Path, PairReport | None]:
    """The stage's preference file plus pairs of the policy's own wrong replies (the model the
    stage starts from), written once beside the corpus and prepared like the other files.
    -> (the prepared file, the sampling report; None when an earlier run wrote the file)."""
    name = Path(plan.data).stem + "_on_policy"
    jsonl, out = corpus / f"{name}.jsonl", corpus / f"{name}.h5"
    report = None
    if not jsonl.is_file():
        config = PairConfig(samples=plan.on_policy_samples, temperature=cfg.temperature,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        records, report = on_policy_pairs(policy, tok, read_jsonl(corpus / plan.data), config)
        write_pairs(jsonl, records)
    if not out.is_file():
        prepare(plan.strategy, [jsonl], out, tokenizer, PrepareConfig(num_workers=0),
                progress=cfg.progress)
    return out, report


def completed_checkpoint(folder: Path, steps: int) -> Path | None:
    found = dict(list_checkpoints(folder))
    return found.get(steps)


def stage_values(cfg: QuickstartConfig, plan: StagePlan, tokenizer: Path) -> dict[str, Any]:
    """TrainConfig fields of a stage: the plan's schedule, one checkpoint at the end (and on
    Ctrl-C), metrics every few steps."""
    return {"strategy": plan.strategy, "max_steps": plan.steps, "n_epoch": 1000,
            "batch_size": plan.batch_size, "learning_rate": plan.learning_rate,
            "warmup_steps": plan.warmup_steps, "seed": cfg.seed,
            "out": str(cfg.out / plan.name), "ckpt_interval": plan.steps, "keep_last": 1,
            "log_interval": max(1, min(10, plan.steps // 4)), "progress": cfg.progress,
            "tokenizer": str(tokenizer), "device": "auto", **online_values(cfg, plan),
            **plan.values}


def online_values(cfg: QuickstartConfig, plan: StagePlan) -> dict[str, Any]:
    """The GRPO stage samples from the live policy and scores with the corpus's rewards."""
    if plan.strategy != "grpo":
        return {}
    return {"online": True, "reward": ",".join(cfg.rewards),
            "grpo_group_size": cfg.group_size, "rollout_max_tokens": cfg.max_new_tokens,
            "rollout_temperature": cfg.temperature}


def train_stage(cfg: QuickstartConfig, plan: StagePlan, data: Path, tokenizer: Path,
                init: Path | None) -> Path:
    """Train one stage and return its final checkpoint (a servable model folder). `init` is the
    previous stage's checkpoint; None starts the `preset` from random weights."""
    folder = cfg.out / plan.name
    done = completed_checkpoint(folder, plan.steps)
    if done is not None:
        return done
    opts = LaunchOptions(out=folder, data=data, model=init, preset=None if init else cfg.preset,
                         max_seq_len=plan.max_seq_len, values=stage_values(cfg, plan, tokenizer))
    latest = list_checkpoints(folder)
    checkpoint = Checkpoint.load(latest[-1][1]) if latest else None  # resume an interrupted stage
    config: TrainConfig = build_config(opts)
    if len(config.dataset) < config.batch_size:  # a small --corpus-size: one batch of everything
        config = config.replace(batch_size=len(config.dataset))
    write_launch(opts, config)
    context = Trainer(config).train(checkpoint)
    if context.stop_requested:
        raise KeyboardInterrupt(f"stopped during the {plan.name} stage; run the same command "
                                "again to continue")
    if context.last_checkpoint is None:
        raise RuntimeError(f"the {plan.name} stage wrote no checkpoint")
    return context.last_checkpoint
