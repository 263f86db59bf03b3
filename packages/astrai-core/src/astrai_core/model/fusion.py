"""Fused input projections for serving, as vLLM's models have them (QKVParallelLinear,
MergedColumnParallelLinear): q, k, v (and the attention gate) become one `qkv_proj`, the
SwiGLU gate and up one `gate_up_proj`, so a decode step runs 4 products per layer instead of 7.

Serving calls `fuse_projections(model)` once, after loading and before the engine starts; the
fused layer then becomes a packed or int8 serving kernel like any other. At batch 1 every
product pays a fixed cost on top of reading its weights (a thread wake-up, and for int8 the
activation scaling), which is what the three calls saved per layer buy back (docs/benchmarks.md).
Training keeps the separate layers: checkpoints, LoRA and the Hugging Face names stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from astrai_core.model.linear import Linear


def fused_linear(parts: list[nn.Module]) -> Linear | None:
    """One `Linear` whose output is the parts' outputs side by side; None unless every part is
    a plain `Linear` over the same input (a LoRA-wrapped or already-served layer stays apart)."""
    if not parts or any(type(p) is not Linear for p in parts):
        return None
    if len({p.in_features for p in parts}) != 1:
        return None
    weight = torch.cat([p.weight.detach() for p in parts])
    biases = [p.bias for p in parts]
    with torch.device("meta"):  # the real tensors are the concatenations below: no throwaway init
        fused = Linear(weight.shape[1], weight.shape[0], bias=any(b is not None for b in biases))
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([
            b.detach() if b is not None else weight.new_zeros(p.out_features)
            for p, b in zip(parts, biases, strict=True)
        ]), requires_grad=False)
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Fuse every attention and SwiGLU layer of `model` that allows it, in place; returns how
    many were fused. For inference only: the fused model trains and saves differently."""
    count = 0
    for module in model.modules():
        fuse = getattr(module, "fuse_projections", None)
        if fuse is not None and fuse():
            count += 1
    return count
