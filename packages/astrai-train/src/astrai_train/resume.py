"""Exact checkpoint and resume: what a checkpoint holds and how a run is put back in that state.

A checkpoint at step N is taken at the end of optimizer step N, so it holds the weights after
N updates, the optimizer and schedule after N steps, the sampler position after the micro-
batches those steps consumed, and every RNG state at that moment. A resumed run restores all of
it (RNG states last, after everything that building the run may have drawn), then continues
exactly where an uninterrupted run would.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from astrai_core import Checkpoint, LoRAAdapter
from astrai_core.model.lora import (
    base_checksum,
    has_lora,
    is_lora_parameter,
    load_lora_state_dict,
    lora_config_of,
)
from astrai_train.context import TrainContext
from astrai_train.parallel.wrap import (
    full_optimizer_state_dict,
    is_fsdp,
    load_full_optimizer_state_dict,
)
from astrai_train.rng import capture_rng_state, restore_rng_state
from astrai_train.strategies import BaseStrategy

STEP_DIR = re.compile(r"^step_(\d{8,})$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` as (step, path), oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return sorted(found)


def find_latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


CORRUPT_SUFFIX = ".corrupt"


def load_latest_intact(folder: str | Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint in `folder` that loads, and one line per newer one that did not.

    A checkpoint that fails to load (truncated weights, unreadable state) is renamed to
    `step_X.corrupt` rather than deleted: nothing of the user's is lost, and it no longer counts
    as the latest (nor among the `keep_last` newest). None when there is no checkpoint; an error
    naming each failure when none loads."""
    notes: list[str] = []
    found = list_checkpoints(folder)
    for step, path in reversed(found):
        try:
            checkpoint = Checkpoint.load(path)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            aside = path.with_name(path.name + CORRUPT_SUFFIX)
            path.rename(aside)
            notes.append(f"checkpoint {path.name} is unreadable ({exc}); moved it to {aside.name}")
            continue
        if notes:
            notes.append(f"resuming from {path.name}, the newest intact checkpoint (step {step})")
        return checkpoint, notes
    if found:
        raise ValueError(f"no checkpoint in {folder} can be read: {'; '.join(notes)}; start a new "
                         "run (drop --resume and choose another --out)")
    return None, notes


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all)."""
    if keep_last > 0:
        for _, path in list_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def tokenizer_files(folder: str | Path | None) -> dict[str, Path]:
    if folder is None:
        return {}
    return {name: Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()}


def reference_checksum(strategy: BaseStrategy) -> float | None:
    """A fingerprint of the frozen reference weights, to refuse resuming against another one."""
    refs = strategy.reference_models()
    if not refs:
        return None
    with torch.no_grad():
        return float(sum(p.double().sum() for ref in refs for p in ref.parameters()))


def build_checkpoint(ctx: TrainContext) -> Checkpoint | None:
    """The checkpoint of this step on rank 0; None on the other ranks. Every rank must call it:
    under FSDP the full weights and optimizer state are gathered (collectives) to rank 0.

    Under FSDP the optimizer state is stored unsharded and keyed by parameter name (the format
    of torch.distributed.checkpoint's full state dicts), so any world size can load it; else
    it is the optimizer's own state_dict (DDP keeps it identical on every rank). RNG states are
    rank 0's: every rank seeds the same and draws the same (no rank-dependent randomness)."""
    weights = ctx.model_state_dict()
    optimizer = optimizer_state_dict(ctx)
    if not ctx.is_main_process:
        return None
    trainer = {"iteration": ctx.iteration, "epoch": ctx.epoch, "tokens_seen": ctx.tokens_seen,
               "samples_seen": ctx.samples_seen, "reference_checksum": ctx.reference_checksum,
               "config": ctx.config.to_dict()}
    adapter = None
    if has_lora(ctx.raw_model):  # the adapter alone: the frozen base stays where it came from
        adapter = LoRAAdapter(lora_config_of(ctx.raw_model),
                              {k: v for k, v in weights.items() if is_lora_parameter(k)})
        weights = {}
        trainer["lora_base_checksum"] = base_checksum(ctx.raw_model)
    states: dict[str, Any] = {
        "optimizer": optimizer,
        "scheduler": ctx.scheduler.state_dict() if ctx.scheduler is not None else {},
        "sampler": ctx.sampler.state_dict(),
        "rng": capture_rng_state(),
        "trainer": trainer,
    }
    return Checkpoint(weights, epoch=ctx.epoch, iteration=ctx.iteration,
                      config=None if adapter else getattr(ctx.raw_model, "config", None),
                      states=states, files=tokenizer_files(ctx.config.tokenizer), adapter=adapter)


def load_model_state(model: nn.Module, checkpoint: Checkpoint) -> None:
    lora = has_lora(model)
    if (checkpoint.adapter is not None) != lora:
        raise ValueError(
            "the checkpoint holds a LoRA adapter but this run trains the whole model; resume "
            "with the run's --lora-rank (and --model: its base)" if not lora else
            "this run trains LoRA adapters but the checkpoint holds full weights; resume it "
            "without --lora-rank, or start a LoRA run from it with --model CKPT")
    if lora:
        want, have = checkpoint.adapter.config, lora_config_of(model)
        if (want.rank, want.resolved_alpha, set(want.targets)) != (
                have.rank, have.resolved_alpha, set(have.targets)):
            raise ValueError(f"the checkpoint's adapter (rank {want.rank}, alpha "
                             f"{want.resolved_alpha:g}, {','.join(sorted(want.targets))}) differs "
                             f"from this run's (rank {have.rank}, alpha {have.resolved_alpha:g}, "
                             f"{','.join(sorted(have.targets))}); resume with the same --lora-* "
                             "options")
        load_lora_state_dict(model, checkpoint.adapter.state)
        return
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint's weights do not fit this model ({exc}); resume with "
                         "the same --model/--preset as the run that wrote it") from None


def restore_training_state(ctx: TrainContext, checkpoint: Checkpoint) -> None:
    states = checkpoint.states
    missing = [g for g in ("optimizer", "sampler", "rng", "trainer") if g not in states]
    if missing:
        raise ValueError(f"the checkpoint lacks training state ({', '.join(missing)}): it is a "
                         "model folder, not a training checkpoint; start a new run from it instead")
    trainer = states["trainer"]
    _check_compatible(ctx, trainer)
    load_optimizer_state(ctx, states["optimizer"])
    if ctx.scheduler is not None and states.get("scheduler"):
        ctx.scheduler.load_state_dict(states["scheduler"])
    ctx.sampler.load_state_dict(states["sampler"])
    ctx.iteration, ctx.epoch = int(trainer["iteration"]), int(trainer["epoch"])
    ctx.tokens_seen, ctx.samples_seen = int(trainer["tokens_seen"]), int(trainer["samples_seen"])
    restore_rng_state(states["rng"])


def optimizer_state_dict(ctx: TrainContext) -> dict[str, Any]:
    if is_fsdp(ctx.raw_model):
        return full_optimizer_state_dict(ctx.raw_model, ctx.optimizer)
    return ctx.optimizer.state_dict()


def load_optimizer_state(ctx: TrainContext, state: dict[str, Any]) -> None:
    """Parameter-name keys (a full state dict, written under FSDP) load into any model, sharded
    or not; index keys are the optimizer's own state_dict."""
    by_name = any(isinstance(k, str) for k in state.get("state", {})) or any(
        isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))
    if by_name:
        load_full_optimizer_state_dict(ctx.raw_model, ctx.optimizer, state)
    else:
        ctx.optimizer.load_state_dict(state)


def _check_compatible(ctx: TrainContext, trainer: dict[str, Any]) -> None:
    saved = trainer.get("config", {})
    if saved.get("strategy", ctx.config.strategy) != ctx.config.strategy:
        raise ValueError(f"the checkpoint was written by a '{saved['strategy']}' run; resume it "
                         f"with --strategy {saved['strategy']} or start a new run in another --out")
    base = trainer.get("lora_base_checksum")
    if base is not None and base != base_checksum(ctx.raw_model):
        raise ValueError("the base model differs from the one this LoRA run trained on; resume "
                         "with the same --model (the checkpoint holds only the adapter)")
    want, have = trainer.get("reference_checksum"), ctx.reference_checksum
    if want is not None and have is not None and want != have:
        raise ValueError("the reference model differs from the one this run started with; "
                         "resume with the same --model (the starting policy), not a checkpoint")
