"""Direct preference optimisation against a frozen reference model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from astrai_train.strategies.base import BaseStrategy, Batch, reference_of
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
                         "`astrai data prepare --strategy dpo`")
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
    The reference is a frozen copy of the policy as given, or under a LoRA policy the base with
    the adapters off (pass `ref_model` to use another).

    Online (a `rollout_source`, e.g. `--online --reward NAME`): the data holds prompts; each step
    samples G responses per prompt from the live policy, scores them, and trains on the best
    and the worst response of each prompt (`preference_pairs`); a prompt whose responses all
    score the same gives no preference and weighs nothing.

    `rpo_alpha` > 0 adds rpo_alpha times the chosen replies' mean token NLL (TRL's rpo_alpha;
    Pang et al., "Iterative Reasoning Preference Optimization", 2024). DPO alone only widens
    the gap between the two replies and often lowers the likelihood of both, which a small
    model feels at once in its greedy answers; the NLL term keeps the chosen ones likely.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu",
                 ref_model: nn.Module | None = None, beta: float = 0.1,
                 reduction: str = "mean", rpo_alpha: float = 0.0,
                 rollout_source: Any = None) -> None:
        super().__init__(model, device)
        if beta <= 0:
            raise ValueError(f"DPO beta must be > 0, got {beta}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"DPO reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        if rpo_alpha < 0:
            raise ValueError(f"DPO rpo_alpha must be >= 0, got {rpo_alpha}")
        self.ref_model = ref_model if ref_model is not None else reference_of(model)
        self.beta = beta
        self.reduction = reduction
        self.rpo_alpha = rpo_alpha
        self.average_over_window = reduction == "mean"
        self.rollout_source = rollout_source

    def prepare_batch(self, batch: Any) -> Batch:
        if isinstance(batch, list):  # prompt items: sample, score and pair the responses now
            if self.rollout_source is None:
                raise ValueError("this DPO dataset holds prompts only: train it online "
                                 "(--online --reward NAME), or prepare preference pairs with "
                                 "`astrai data prepare --strategy dpo`")
            return preference_pairs(self.rollout_source(batch, self.model))
        if self.rollout_source is not None:
            raise ValueError("--online samples responses to prompts, but this dataset holds "
                             "preference pairs; drop --online to train on them offline")
        return batch

    def close(self) -> None:
        """Release the rollout source's engine (its KV cache and step thread)."""
        close = getattr(self.rollout_source, "close", None)
        if close is not None:
            close()

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        ids, labels, mask = stack_pairs(batch)
        policy = sequence_log_probs(self.model, ids, labels, mask)  # (2B,)
        with torch.no_grad():
            ref = sequence_log_probs(self.ref_model, ids, labels, mask)
        rewards = self.beta * (policy - ref)  # implicit rewards, (2B,)
        chosen, rejected = rewards.chunk(2)
        margin = chosen - rejected
        losses = -F.logsigmoid(margin)
        if self.rpo_alpha:
            chosen_tokens = mask.chunk(2)[0].sum(-1).clamp(min=1)
            losses = losses - self.rpo_alpha * policy.chunk(2)[0] / chosen_tokens
        weights = batch.get("pair_weights")
        if weights is None:
            self._record(chosen.detach(), rejected.detach(), margin.detach())
            return losses.mean() if self.reduction == "mean" else losses.sum()
        # Online pairs are weighted: 0 for a prompt whose responses all scored the same.
        weights = weights.to(losses)
        self._record(chosen.detach(), rejected.detach(), margin.detach(), weights)
        self.metrics["sampled_reward_mean"] = batch["sampled_rewards"].float().mean()
        total = (losses * weights).sum()
        return total / weights.sum().clamp(min=1) if self.reduction == "mean" else total

    def _record(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor,
                weights: torch.Tensor | None = None) -> None:
        def mean(values: torch.Tensor) -> torch.Tensor:
            if weights is None:
                return values.mean()
            return (values * weights).sum() / weights.sum().clamp(min=1)

        self.metrics = {"rewards_chosen": mean(chosen), "rewards_rejected": mean(rejected),
                        "reward_margin": mean(margin), "reward_accuracy": mean((margin > 0).float())}

    def loss_weight(self, batch: Batch) -> float:
        if "pair_weights" in batch:
            return float(batch["pair_weights"].sum())
        return float(batch["chosen_input_ids"].shape[0])

    def reference_models(self) -> list[nn.Module]:
        return [self.ref_model]


def preference_pairs(groups: Batch) -> Batch:
    """A scored group batch (input_ids, labels, loss_mask (B, G, T), rewards (B, G), as online
    GRPO's rollouts) -> a DPO batch of each prompt's best (chosen) and worst (rejected)
    response, with `pair_weights` 0 where all G rewards are equal (no preference)."""
    rewards = groups["rewards"]
    rows = torch.arange(rewards.shape[0])
    best, worst = rewards.argmax(-1), rewards.argmin(-1)
    batch: Batch = {}
    for side, pick in (("chosen", best), ("rejected", worst)):
        for key in ("input_ids", "labels", "loss_mask", "attention_mask"):
            if key in groups:  # the attention masks only count real tokens (throughput)
                batch[f"{side}_{key}"] = groups[key][rows, pick]
    batch["pair_weights"] = (rewards.amax(-1) > rewards.amin(-1)).float()
    batch["sampled_rewards"] = rewards
    return batch
