"""Direct preference optimisation against a frozen reference model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_train.strategies.base import BaseStrategy, Batch, frozen_copy
from astrai_train.strategies.factory import StrategyFactory
from astrai_train.strategies.logprobs import sequence_log_probs

REDUCTIONS = ("mean", "sum")
SIDES = ("chosen", "rejected")


def _pad_to(t: torch.Tensor, length: int, value: int | bool) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[-1]), value=value)


def stack_pairs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chosen_* (B, Tc) and rejected_* (B, Tr) -> input_ids, labels, loss_mask (2B, max(Tc, Tr)),
    chosen rows first, so both sides go through the model in one forward pass."""
    missing = [f"{s}_{k}" for s in SIDES for k in ("input_ids", "labels", "loss_mask")
               if f"{s}_{k}" not in batch]
    if missing:
        raise ValueError(f"DPO batches need {', '.join(missing)}; prepare the data with "
                         "`astrai data prepare --kind dpo`")
    T = max(batch[f"{s}_input_ids"].shape[1] for s in SIDES)
    ids = torch.cat([_pad_to(batch[f"{s}_input_ids"], T, 0) for s in SIDES])
    labels = torch.cat([_pad_to(batch[f"{s}_labels"], T, 0) for s in SIDES])
    mask = torch.cat([_pad_to(batch[f"{s}_loss_mask"], T, False) for s in SIDES])
    return ids, labels, mask


@StrategyFactory.register("dpo")
class DPOStrategy(BaseStrategy):
    """L = -log sigmoid(beta * (log pi/pi_ref)(y_w|x) - beta * (log pi/pi_ref)(y_l|x)), with
    log pi(y|x) the summed log-probability of the response tokens.

    `reduction` "mean" averages over the pairs of an optimizer step, "sum" adds them up.
    The reference is a frozen copy of the policy as given (pass `ref_model` to use another).
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu",
                 ref_model: nn.Module | None = None, beta: float = 0.1,
                 reduction: str = "mean") -> None:
        super().__init__(model, device)
        if beta <= 0:
            raise ValueError(f"DPO beta must be > 0, got {beta}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"DPO reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.ref_model = ref_model if ref_model is not None else frozen_copy(model)
        self.beta = beta
        self.reduction = reduction
        self.average_over_window = reduction == "mean"

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        ids, labels, mask = stack_pairs(batch)
        policy = sequence_log_probs(self.model, ids, labels, mask)  # (2B,)
        with torch.no_grad():
            ref = sequence_log_probs(self.ref_model, ids, labels, mask)
        rewards = self.beta * (policy - ref)  # implicit rewards, (2B,)
        chosen, rejected = rewards.chunk(2)
        margin = chosen - rejected
        losses = -F.logsigmoid(margin)
        detached = margin.detach()
        self.metrics = {"rewards_chosen": chosen.detach().mean(),
                        "rewards_rejected": rejected.detach().mean(),
                        "reward_margin": detached.mean(),
                        "reward_accuracy": (detached > 0).float().mean()}
        return losses.mean() if self.reduction == "mean" else losses.sum()

    def loss_weight(self, batch: Batch) -> float:
        return float(batch["chosen_input_ids"].shape[0])

    def reference_models(self) -> list[nn.Module]:
        return [self.ref_model]
