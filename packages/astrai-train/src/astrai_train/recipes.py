"""Build steps of the optional recipes, called by `TrainContextBuilder`: LoRA adapters,
distillation's teacher, activation checkpointing and fitting the run to a memory budget."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from astrai_core import Checkpoint, LoRAConfig
from astrai_core.model.lora import apply_lora
from astrai_train.config import TrainConfig
from astrai_train.memory import fit_memory
from astrai_train.parallel import get_rank, get_world_size, resolve_parallel

# What a resumed --fit-memory run takes from its checkpoint instead of measuring again.
FITTED_FIELDS = ("batch_size", "accumulation_steps", "activation_checkpointing")


def add_lora(cfg: TrainConfig, model: nn.Module) -> None:
    """--lora-rank: freeze the model and add trainable adapters to the targeted layers."""
    if cfg.lora_rank is None:
        return
    config = LoRAConfig.from_targets_text(cfg.lora_targets, rank=cfg.lora_rank,
                                          alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    apply_lora(model, config)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each decoder block in backward (the Transformer's `gradient_checkpointing`)."""
    if not enabled:
        return
    if not hasattr(model, "gradient_checkpointing"):
        raise ValueError(f"--activation-checkpointing checkpoints the decoder blocks of an AstrAI "
                         f"Transformer; this model is a {type(model).__name__}")
    model.gradient_checkpointing = True


def add_teacher(cfg: TrainConfig, objects: dict[str, Any]) -> None:
    """--strategy distill: load --teacher (checked against the student's tokenizer)."""
    if cfg.strategy != "distill" or "teacher" in objects:
        return
    if cfg.teacher is None:
        raise ValueError("--strategy distill needs --teacher DIR: the model folder whose "
                         "next-token distribution the student learns")
    from astrai_train.strategies.distill import load_teacher

    objects["teacher"] = load_teacher(cfg.teacher, cfg.tokenizer)


def fit_to_memory(cfg: TrainConfig, strategy: Any, model: nn.Module, device: torch.device,
                  collate: Callable[..., Any], autocast_dtype: torch.dtype | None,
                  checkpoint: Checkpoint | None) -> TrainConfig:
    """--fit-memory: the config with the micro-batch, accumulation and checkpointing chosen
    (memory.py); a resumed run keeps the choice its checkpoint recorded."""
    if cfg.fit_memory is None:
        return cfg
    if checkpoint is not None:
        saved = checkpoint.states.get("trainer", {}).get("config", {})
        fitted = cfg.replace(**{k: saved[k] for k in FITTED_FIELDS if k in saved})
        set_activation_checkpointing(model, fitted.activation_checkpointing)
        return fitted
    if resolve_parallel(cfg.parallel, get_world_size()) == "fsdp":
        raise ValueError("--fit-memory measures whole-model steps; under --parallel fsdp set "
                         "--batch-size and --accumulation-steps yourself")

    def autocast() -> AbstractContextManager[Any]:
        if autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    fit = fit_memory(cfg, strategy, model, collate, device, autocast)
    micro = _agree_across_ranks(fit.micro_batch, device)
    global_batch = cfg.batch_size * cfg.accumulation_steps
    micro = max(d for d in range(1, micro + 1) if global_batch % d == 0)
    if get_rank() == 0:
        print(fit.describe(), file=sys.stderr, flush=True)
    model.gradient_checkpointing = fit.activation_checkpointing
    return cfg.replace(batch_size=micro, accumulation_steps=global_batch // micro,
                       activation_checkpointing=fit.activation_checkpointing)


def _agree_across_ranks(micro: int, device: torch.device) -> int:
    """Data-parallel ranks step in lockstep: all take the smallest micro-batch any chose."""
    if get_world_size() == 1:
        return micro
    value = torch.tensor([micro], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return int(value.item())
