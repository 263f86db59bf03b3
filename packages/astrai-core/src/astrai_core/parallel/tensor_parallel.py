"""Tensor-parallel mode of the `Transformer`: attention heads and the MLP split across ranks.

`parallelize_transformer(model, group)` shards a full model in place (every rank loads the same
checkpoint, then keeps its slice); `gather_tensor_parallel_state_dict` rebuilds the full state
dict so a checkpoint written by N ranks loads in one process. Embedding, norms and lm_head stay
replicated: for small models they are cheap, and it keeps the logits whole on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from astrai_core.model.attention import GQA
from astrai_core.model.mlp import MLP
from astrai_core.model.transformer import Transformer
from astrai_core.parallel.layers import ColumnParallelLinear, RowParallelLinear

COLUMN = ("q_proj", "k_proj", "v_proj", "g_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def parallelize_transformer(model: Transformer, group: dist.ProcessGroup | None = None) -> Transformer:
    world = dist.get_world_size(group)
    config = model.config
    if config.attention_type == "mla":
        raise ValueError("tensor parallelism supports GQA models; MLA is not sharded yet")
    for name, count in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
                        ("dim_ffn", config.dim_ffn)):
        if count % world != 0:
            raise ValueError(f"ModelConfig.{name} ({count}) must be divisible by the tensor-parallel size {world}")
    for module in model.modules():
        if isinstance(module, (GQA, MLP)):
            _shard_module(module, group)
        if isinstance(module, GQA):
            module.n_heads //= world
            module.n_kv_heads //= world
            for norm in (module.q_norm, module.k_norm):
                if norm is not None:
                    _sum_gradient_across_ranks(norm.weight, group)
    model.tensor_parallel_group = group
    return model


def _sum_gradient_across_ranks(param: torch.nn.Parameter, group: dist.ProcessGroup | None) -> None:
    """A replicated weight used inside the sharded region (qk-norm) sees only this rank's heads,
    so its gradient is the sum over ranks."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(hook)


def _shard_module(module: torch.nn.Module, group: dist.ProcessGroup | None) -> None:
    for name in COLUMN:
        linear = getattr(module, name, None)
        if linear is not None:
            setattr(module, name, ColumnParallelLinear.from_linear(linear, group))
    for name in ROW:
        linear = getattr(module, name, None)
        if linear is not None:
            setattr(module, name, RowParallelLinear.from_linear(linear, group))


def gather_tensor_parallel_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict, on every rank."""
    group = getattr(model, "tensor_parallel_group", None)
    world = dist.get_world_size(group)
    full: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name, tensor in model.state_dict().items():
        owner, _, pname = name.rpartition(".")
        module = modules.get(owner)
        dim = None
        if isinstance(module, ColumnParallelLinear):
            dim = 0
        elif isinstance(module, RowParallelLinear) and pname == "weight":
            dim = 1
        if dim is None:
            full[name] = tensor
            continue
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        full[name] = torch.cat(parts, dim=dim)
    return full
