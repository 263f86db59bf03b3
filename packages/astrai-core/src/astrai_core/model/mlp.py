"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_core.model.linear import Linear


class MLP(nn.Module):
    def __init__(self, dim: int, dim_ffn: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, dim_ffn, bias)
        self.up_proj = Linear(dim, dim_ffn, bias)
        self.down_proj = Linear(dim_ffn, dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
