"""Rotary position embedding (RoFormer), in the half-rotation layout Llama/Qwen checkpoints use.

cos/sin are computed in fp32 from explicit position ids, then cast to the activation dtype,
exactly as `transformers` does, so logits match to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.base = base
        # A plain attribute, not a buffer: it must stay fp32 when the model is cast to bf16,
        # and be real (not meta) when the model was built on the meta device.
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exponent = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            self._inv_freq[device] = (1.0 / (self.base**exponent)).to(device)
        return self._inv_freq[device]

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, T, dim) in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq(x.device)  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
