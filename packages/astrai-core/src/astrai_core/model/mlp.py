"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_core.model.fusion import fused_linear
from astrai_core.model.linear import Linear


class MLP(nn.Module):
    def __init__(self, dim: int, dim_ffn: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, dim_ffn, bias)
        self.up_proj = Linear(dim, dim_ffn, bias)
        self.down_proj = Linear(dim_ffn, dim, bias)
        self.gate_up_proj: Linear | None = None  # serving only: gate and up in one product

    def fuse_projections(self) -> bool:
        """Replace gate/up by one `gate_up_proj` (serving; `astrai_core.model.fusion`)."""
        fused = fused_linear([self.gate_proj, self.up_proj])
        if fused is None:
            return False
        self.gate_up_proj, self.gate_proj, self.up_proj = fused, None, None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
