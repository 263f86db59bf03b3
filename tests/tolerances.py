"""Numeric tolerances for tests, derived from the dtype's epsilon and the computation (the number
of terms summed, their magnitude, the operations in between), never tuned on one machine: CI runs
on whatever CPU the submitter has (Intel without bf16, AMD with AVX512-BF16, ...), and each of
them sums in its own order.

Tests that compare two computations of the same quantity (DDP vs one process, cached decode vs a
full forward, ours vs Hugging Face) run them in float64 where they can: the bounds are then
around 1e-12, far below any real defect and far above any CPU's reordering noise.
"""

from __future__ import annotations

import torch


def reorder_bound(terms: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> float:
    """How far two computations of the same sum of `terms` numbers (absolute values summing to
    at most `scale`) can differ when they add in another order, as DDP vs one process, FSDP
    shards, accumulation or GEMM blocking do: (terms - 1) * eps * scale (Higham, "Accuracy and
    Stability of Numerical Algorithms", eq. 4.4; eps is the dtype's machine epsilon). This holds
    on every CPU; what one machine happened to print does not."""
    return max(terms - 1, 1) * torch.finfo(dtype).eps * scale


def adamw_drift_bound(steps: int, lr: float, grad_error: float, adam_eps: float = 1e-8) -> float:
    """How far AdamW weights can drift apart after `steps` updates whose gradients differ by at
    most `grad_error` per element: the update m/(sqrt(v) + eps) has slope at most 1/eps in g
    (the worst case is g near 0), it is scaled by lr, and the steps add up."""
    return steps * lr * grad_error / adam_eps


def forward_bound(n_layers: int, width: int, scale: float, dtype: torch.dtype = torch.float64) -> float:
    """How far two computations of a decoder's outputs (logits, hidden states) can differ when
    they round differently (another batch layout, GEMM blocking, a cache): each of the
    2 * n_layers + 1 matmul stages sums at most `width` products, so to first order the relative
    error grows by width * eps per stage; `scale` is the largest |output|."""
    return reorder_bound((2 * n_layers + 1) * width, scale=scale, dtype=dtype)
