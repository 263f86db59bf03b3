"""`BaseStrategy`: turns a batch into a loss. The trainer owns everything else (accumulation,
precision, clipping, the optimizer), so a strategy is just its loss formula."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from astrai_core.model.lora import adapters_disabled, has_lora, is_lora_parameter

Batch = dict[str, Any]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference model: a copy of `model` as it is now, in eval mode and without gradients."""
    ref = copy.deepcopy(model)  # deepcopy keeps tied weights tied
    ref.eval()
    ref.requires_grad_(False)
    return ref


class AdaptersOff(nn.Module):
    """The reference of a LoRA policy: the policy itself with its adapters switched off, i.e.
    the frozen base, without a second copy of the weights. It runs in eval mode (as a frozen
    copy would) and owns no parameters; `parameters()` yields the base's, for fingerprints."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy = [policy]  # a list, so the policy is not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self._policy[0]
        was_training = policy.training
        policy.eval()
        try:
            with adapters_disabled(policy):
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return (p for n, p in self._policy[0].named_parameters() if not is_lora_parameter(n))


def reference_of(model: nn.Module) -> nn.Module:
    """DPO's and GRPO's frozen reference: the base under a LoRA policy, else a frozen copy."""
    return AdaptersOff(model) if has_lora(model) else frozen_copy(model)


def count_tokens(batch: Batch) -> int:
    """Real (non-padding) input tokens in a batch, for throughput."""
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


class BaseStrategy(ABC):
    """A loss over batches of one strategy.

    `compute_loss(batch)` returns the batch's mean loss; `loss_weight(batch)` says how many units
    (tokens, pairs) that mean is over, so the trainer can weight the micro-batches of an
    accumulation window and reproduce the loss of the whole window as one batch. Strategies
    put detached per-batch statistics in `self.metrics` (never synced here: the logger does it).
    """

    # False when the loss is a sum over units: micro-batches then add up instead of averaging.
    average_over_window: ClassVar[bool] = True

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self.metrics: dict[str, torch.Tensor] = {}

    @abstractmethod
    def compute_loss(self, batch: Batch) -> torch.Tensor:
        """Scalar loss of a batch already on `self.device`."""

    def loss_weight(self, batch: Batch) -> float:
        """Units `compute_loss` averages over (called on the batch before it moves to the device)."""
        return float(len(next(iter(batch.values()))))

    def prepare_batch(self, batch: Any) -> Batch:
        """Turn what the data loader yields into a tensor batch (online RL generates here)."""
        return batch

    def move_to_device(self, batch: Batch) -> Batch:
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def reference_models(self) -> list[nn.Module]:
        """Frozen models the strategy keeps beside the policy (moved with it, never trained)."""
        return []
