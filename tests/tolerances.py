"""Numeric tolerances for tests, derived from the dtype's epsilon and the computation (the number
of terms summed, their magnitude, the operations in between), never tuned on one machine: CI runs
on whatever CPU the submitter has (Intel without bf16, AMD with AVX512-BF16, ...), and each of
them sums in its own order.

Tests that compare two computations of the same quantity (DDP vs one process, cached decode vs a
full forward, ours vs Hugging Face) run them in float64 where they can: the bounds are then
around 1e-12, far below any real defect and far above any CPU's reordering noise.
"""

from __future__ import annotations

import math

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


def reduced_precision_bound(n_layers: int, width: int, scale: float, stage_error: float) -> float:
    """How far a decoder's logits can move when each of its 2L+1 matmul stages rounds every
    product |x_k w_k| by at most `stage_error`: a stage's error is at most stage_error times
    sum_k |x_k w_k|, which for independent signs is about sqrt(width) times the output's own
    size, and to first order the stages add up (the fp64 analogue is `forward_bound`,
    which takes the worst case, width instead of sqrt(width), as reorderings are not random)."""
    return (2 * n_layers + 1) * stage_error * math.sqrt(width) * scale


# Largest relative error one int8 matmul stage adds, per product |x_k w_nk|: the weight's
# rounding (half a step of max|row| / 127) plus the activation's (7-bit: a step of
# 2 max|x| / 127, so at most max|x| / 127 after rounding and clamping).
INT8_STAGE = 1 / 254 + 1 / 127
BF16_STAGE = 3 * 2.0**-8  # weight, activation and output each rounded to 8 mantissa bits
