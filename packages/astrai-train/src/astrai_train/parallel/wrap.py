"""Data parallelism for the Trainer: wrap the model (DDP or FSDP2), skip the gradient sync of
non-final micro-batches, and gather full model/optimizer states for checkpoints.

- DDP replicates the model; gradients are averaged across ranks in backward.
- FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state: every transformer
  block is one unit, the root (embedding, final norm, lm_head) another. Parameters become
  DTensors; their gradients are averaged by reduce-scatter.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


def resolve_parallel(mode: str, world_size: int) -> str:
    """'auto' is DDP with more than one process, nothing with one."""
    if mode == "auto":
        return "ddp" if world_size > 1 else "none"
    return mode


def wrap_parallel(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """-> the module that runs forward. FSDP shards `model` in place and returns it."""
    if mode == "none":
        return model
    if not dist.is_initialized():
        raise ValueError(f"TrainConfig.parallel='{mode}' needs torch.distributed: launch with "
                         "`astrai train --nprocs N`, torchrun, or spawn_parallel_fn")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}; use one of {', '.join(PARALLEL_MODES)}")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (members of a ModuleList named `layers`), FSDP's natural units."""
    return [block for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" for block in m]


# torch.distributed.fsdp/.tensor take seconds to import (sympy): they are imported only when a
# model is sharded, and a module not imported yet means no object can be of its types.
def is_fsdp(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, backward accumulates gradients locally unless `enabled` (the last micro-
    batch of an accumulation window): one all-reduce / reduce-scatter per optimizer step."""
    if enabled:
        if is_fsdp(model):
            model.set_requires_gradient_sync(True)
        yield
        return
    no_sync = getattr(model, "no_sync", None)  # DDP
    if no_sync is not None:
        with no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        yield
    else:
        yield


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the gradient norm of sharded grads) as the whole value on every rank."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return value.full_tensor() if tensor and isinstance(value, tensor.DTensor) else value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0 (other ranks: {}). A collective: all ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state unsharded and keyed by parameter name, on rank 0 (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   state: dict[str, Any]) -> None:
    """Every rank passes the full state (all read the same checkpoint) and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def tensor_parallel_grad_norm(model: nn.Module) -> torch.Tensor | None:
    """The global gradient L2 norm of a tensor-parallel model (None if it has no TP layers):
    the shards of ColumnParallelLinear / RowParallelLinear weights are summed across the
    group, replicated parameters (embedding, norms, row bias) count once."""
    from astrai_core.parallel import ColumnParallelLinear, ParallelModel

    layers = [m for m in model.modules() if isinstance(m, ParallelModel)]
    if not layers:
        return None
    sharded = {id(m.weight) for m in layers}
    sharded |= {id(m.bias) for m in layers
                if isinstance(m, ColumnParallelLinear) and m.bias is not None}
    grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    first = next(model.parameters())
    acc = torch.promote_types(first.dtype, torch.float32)  # bf16 sums in fp32; fp64 stays fp64
    zero = torch.zeros((), dtype=acc, device=first.device)
    local = sum((g.to(acc).square().sum() for i, g in grads.items() if i in sharded), zero)
    replicated = sum((g.to(acc).square().sum() for i, g in grads.items() if i not in sharded), zero)
    dist.all_reduce(local, group=layers[0].process_group)
    return (local + replicated).sqrt()
