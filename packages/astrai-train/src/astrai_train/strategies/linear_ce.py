"""Cross entropy fused with the output projection, computed in chunks of tokens.

The usual path materialises the logits (N, V), their log-softmax and, in backward, a gradient of
the same size: three N x V fp32 tensors (13 GB for 4096 x 8 tokens of a 100k vocabulary). Here
each chunk's logits are turned into the loss and, right away, into the gradients with respect to
the hidden states and the projection; only those two (N x D and V x D) are kept for backward.
The arithmetic is the same matmuls (one forward, two backward) plus one softmax instead of a
log-softmax and its backward, so it is also a little faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from astrai_train.parallel.wrap import is_fsdp

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB in fp32


def split_lm_head(model: nn.Module) -> tuple[Callable[..., torch.Tensor], torch.Tensor] | None:
    """(hidden-states function, output projection weight) of an AstrAI Transformer, or None when
    the model must run through forward (another architecture, a wrapper, a compiled model)."""
    hidden_states = getattr(model, "hidden_states", None)
    head = getattr(model, "lm_head", None)
    if not callable(hidden_states) or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None
    if getattr(head, "bias", None) is not None or getattr(model, "_compiled_call_impl", None):
        return None
    if is_fsdp(model):  # sharded weights are gathered by forward's hooks only
        return None
    return hidden_states, head.weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                row_weights: torch.Tensor, smoothing: float, needs_grad: bool) -> torch.Tensor:
        N, V = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // V)
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 for bf16, fp64 stays fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if needs_grad else None
        for start in range(0, N, chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            w = row_weights[start:start + chunk]
            logits = F.linear(h, weight).to(acc)  # (c, V)
            lse = torch.logsumexp(logits, -1)
            loss = lse - logits.gather(1, y[:, None])[:, 0]
            if smoothing:
                loss = (1 - smoothing) * loss + smoothing * (lse - logits.mean(-1))
            total += (loss * w).sum()
            if needs_grad:
                # d loss / d logits = w * (softmax - (1 - s) * onehot(y) - s / V), in place.
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, y[:, None], grad.new_full((len(y), 1), smoothing - 1))
                if smoothing:
                    grad.sub_(smoothing / V)
                grad.mul_(w[:, None])
                grad = grad.to(weight.dtype)
                grad_hidden[start:start + chunk] = grad @ weight
                grad_weight += (grad.t() @ h.to(grad.dtype)).to(acc)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         row_weights: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """sum_i row_weights[i] * CE(hidden[i] @ weight.T, labels[i]) for hidden (N, D), weight (V, D);
    row weights of 1/N give the mean, a mask divided by its count the masked mean."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    row_weights = row_weights.to(torch.promote_types(weight.dtype, torch.float32))
    return _LinearCrossEntropy.apply(hidden, weight, labels, row_weights,
                                     float(label_smoothing), needs_grad)
