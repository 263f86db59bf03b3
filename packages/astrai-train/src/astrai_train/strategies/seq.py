"""Pretraining: next-token cross entropy over every position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_train.strategies.base import BaseStrategy, Batch
from astrai_train.strategies.factory import StrategyFactory
from astrai_train.strategies.linear_ce import linear_cross_entropy, split_lm_head


@StrategyFactory.register("seq")
class SEQStrategy(BaseStrategy):
    """L_PT = -sum_t log P(x_t | x_<t), averaged over the batch's tokens (the seed's sum, divided
    by the token count so the learning rate does not depend on batch size and window).

    On an AstrAI Transformer the output projection and the cross entropy run fused, in chunks
    (`linear_ce.py`): the (B, T, vocab) logits never exist at once.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu",
                 label_smoothing: float = 0.0) -> None:
        super().__init__(model, device)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        # float64 weights, cast to the loss's dtype where used: 1/N is then rounded once, to
        # fp32 for an fp32 model, and stays exact enough for an fp64 one (exactness tests).
        weights = torch.full(labels.shape, 1.0 / labels.numel(), dtype=torch.float64,
                             device=labels.device)
        return self.token_loss(batch["input_ids"], labels, weights)

    def token_loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
                   token_weights: torch.Tensor) -> torch.Tensor:
        """sum over positions of token_weights * cross entropy of labels."""
        split = split_lm_head(self.model)
        if split is not None:
            hidden_states, weight = split
            hidden = hidden_states(input_ids)  # (B, T, D)
            return linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(),
                                        token_weights.flatten(), self.label_smoothing)
        logits = self.model(input_ids)  # (B, T, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                              label_smoothing=self.label_smoothing)
        return (nll * token_weights.flatten().to(nll.dtype)).sum()

    def loss_weight(self, batch: Batch) -> float:
        return float(batch["labels"].numel())
