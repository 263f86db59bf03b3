"""Per-token and per-sequence log-probabilities of labels under a causal LM.

Batches are right-padded (docs/contracts.md), so under causal attention a real token never
attends to the padding after it: the model runs without an attention mask, which keeps SDPA on
its fast causal path, and padded positions are simply masked out of every sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_log_probs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """input_ids, labels (N, T) -> log p(labels[t] | input_ids[:t+1]) in at least fp32 (N, T)."""
    logits = model(input_ids)  # (N, T, V)
    N, T, V = logits.shape
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # cross_entropy fuses log_softmax and the gather: no (N, T, V) log-prob tensor is kept.
    nll = F.cross_entropy(logits.reshape(N * T, V), labels.reshape(N * T), reduction="none")
    return -nll.view(N, T)


def sequence_log_probs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked (response) tokens of each row: (N,)."""
    logp = token_log_probs(model, input_ids, labels)
    return torch.where(loss_mask, logp, 0.0).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is set; 0 (with zero gradient) when nothing is set."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)
