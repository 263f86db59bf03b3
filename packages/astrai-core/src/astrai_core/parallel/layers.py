"""Column- and row-parallel linear layers (tensor parallelism over one process group).

`ColumnParallelLinear` holds a slice of the output features: y_r = x W_r^T. `RowParallelLinear`
holds a slice of the input features and sums the partial products across ranks. A column layer
followed by a row layer (attention q/k/v then o; MLP gate/up then down) needs one all-reduce in
the forward pass and one in the backward pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from astrai_core.parallel.collectives import (
    copy_to_parallel,
    gather_from_parallel,
    reduce_from_parallel,
)


class ParallelModel(nn.Module):
    """Base for modules sharded over a process group."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("tensor parallelism needs torch.distributed initialised (setup_parallel)")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)


def _shard(n: int, world_size: int, what: str) -> int:
    if n % world_size != 0:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel size ({world_size})")
    return n // world_size


class ColumnParallelLinear(ParallelModel):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 gather_output: bool = False, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(process_group)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        local = _shard(out_features, self.world_size, "output features")
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_parallel(x, self.process_group), self.weight, self.bias)
        return gather_from_parallel(y, self.process_group) if self.gather_output else y

    @classmethod
    def from_linear(cls, linear: nn.Module, process_group: dist.ProcessGroup | None = None,
                    gather_output: bool = False) -> ColumnParallelLinear:
        out_f, in_f = linear.weight.shape
        layer = cls(in_f, out_f, linear.bias is not None, gather_output, process_group)
        layer.to(linear.weight)  # keep the dtype and device of the layer it replaces
        with torch.no_grad():
            layer.weight.copy_(linear.weight.chunk(layer.world_size, dim=0)[layer.rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.chunk(layer.world_size, dim=0)[layer.rank])
        return layer


class RowParallelLinear(ParallelModel):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(process_group)
        self.in_features, self.out_features = in_features, out_features
        local = _shard(in_features, self.world_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local))
        # The bias is added once, after the sum, so it is replicated rather than sharded.
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.process_group)
        return y + self.bias if self.bias is not None else y

    @classmethod
    def from_linear(cls, linear: nn.Module, process_group: dist.ProcessGroup | None = None) -> RowParallelLinear:
        out_f, in_f = linear.weight.shape
        layer = cls(in_f, out_f, linear.bias is not None, process_group)
        layer.to(linear.weight)  # keep the dtype and device of the layer it replaces
        with torch.no_grad():
            layer.weight.copy_(linear.weight.chunk(layer.world_size, dim=1)[layer.rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer
