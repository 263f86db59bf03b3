"""Group relative policy optimisation: offline from scored groups, or online from a rollout source.

Batch keys (offline from GRPODataset, or produced by a rollout source):
    input_ids, labels, loss_mask, attention_mask   (B, G, T)  G responses per prompt
    rewards                                        (B, G)
    old_log_probs (optional)                       (B, G, T)  the sampling policy's log-probs
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from astrai_train.strategies.base import BaseStrategy, Batch, reference_of
from astrai_train.strategies.factory import StrategyFactory
from astrai_train.strategies.logprobs import masked_mean, token_log_probs

GROUP_KEYS = ("input_ids", "labels", "loss_mask", "rewards")


class RolloutSource(Protocol):
    """Samples responses for a list of prompt items from the live policy and scores them,
    returning a batch with the keys above (online GRPO)."""

    def __call__(self, prompts: list[dict[str, Any]], policy: nn.Module) -> Batch: ...


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean) / (std + eps) within each group (last axis); r_i - mean alone when
    `scale` is off (Dr. GRPO, Liu et al. 2025: dividing by std weights the questions that are
    nearly always right, or nearly always wrong, most).

    std is the population standard deviation (divide by G, not G - 1): advantages of a group
    with any spread then have exactly unit variance, and G = 2 gives A = +-1 (up to eps).
    """
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(-1, keepdim=True, correction=0) + eps)


@StrategyFactory.register("grpo")
class GRPOStrategy(BaseStrategy):
    """L = -E[min(rho * A, clip(rho, 1-eps, 1+eps) * A)] + kl_coef * E[(log pi - log pi_ref)^2],
    expectations over all response tokens of the batch, rho = exp(log pi - log pi_den) per token.

    pi_den is the frozen reference (the seed's offline formula) unless the batch carries
    `old_log_probs` from the policy that sampled it, which then takes its place in the ratio.
    Online without them (the trainer's rollouts), the batch was sampled by these very weights
    and gets one update, so pi_den is the policy itself, detached: rho = 1 with the policy
    gradient as its gradient, and no second forward (TRL's GRPO skips it alike for one
    iteration per rollout). The KL term always uses the reference.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu",
                 ref_model: nn.Module | None = None, clip_eps: float = 0.2,
                 kl_coef: float = 0.04, group_size: int | None = None,
                 rollout_source: RolloutSource | None = None, adv_eps: float = 1e-4,
                 scale_rewards: bool = True) -> None:
        super().__init__(model, device)
        if not 0 < clip_eps < 1:
            raise ValueError(f"GRPO clip_eps must be in (0, 1), got {clip_eps}")
        if kl_coef < 0:
            raise ValueError(f"GRPO kl_coef must be >= 0, got {kl_coef}")
        if group_size is not None and group_size < 2:
            raise ValueError(f"GRPO group_size must be >= 2 (advantages compare responses), got {group_size}")
        self.ref_model = ref_model if ref_model is not None else reference_of(model)
        self.clip_eps, self.kl_coef, self.group_size = clip_eps, kl_coef, group_size
        self.rollout_source = rollout_source
        self.adv_eps, self.scale_rewards = adv_eps, scale_rewards

    def prepare_batch(self, batch: Any) -> Batch:
        if isinstance(batch, list):  # prompt items: sample and score the responses now
            if self.rollout_source is None:
                raise ValueError("this GRPO dataset holds prompts only: train it online "
                                 "(--online --reward NAME, or a rollout_source from Python), "
                                 "or prepare scored groups for offline GRPO")
            return self.rollout_source(batch, self.model)
        return batch

    def close(self) -> None:
        """Release the rollout source's engine (its KV cache and step thread)."""
        close = getattr(self.rollout_source, "close", None)
        if close is not None:
            close()

    def _check(self, batch: Batch) -> None:
        missing = [k for k in GROUP_KEYS if k not in batch]
        if missing:
            raise ValueError(f"GRPO batches need {', '.join(missing)} with shape (B, G, T) and "
                             "rewards (B, G); prepare the data with `astrai data prepare --strategy grpo`")
        G = batch["rewards"].shape[-1]
        if self.group_size is not None and self.group_size != G:
            raise ValueError(f"the data has {G} responses per prompt but grpo_group_size is "
                             f"{self.group_size}; set grpo_group_size={G} or leave it unset")
        if G < 2:
            raise ValueError("GRPO needs at least 2 responses per prompt to compare them")

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        self._check(batch)
        B, G, T = batch["input_ids"].shape
        ids, labels = batch["input_ids"].view(B * G, T), batch["labels"].view(B * G, T)
        mask = batch["loss_mask"].view(B * G, T)
        logp = token_log_probs(self.model, ids, labels)  # (BG, T)
        # Advantages in float64 (B x G numbers: free), then in the log-probs' dtype.
        adv = group_advantages(batch["rewards"].double(), self.adv_eps,
                               self.scale_rewards).view(B * G, 1).to(logp)
        with torch.no_grad():
            ref = token_log_probs(self.ref_model, ids, labels)
        old = batch.get("old_log_probs")
        if old is not None:
            den = old.view(B * G, T).to(logp)
        else:  # online: sampled by these weights; offline: the seed's formula
            den = logp.detach() if self.rollout_source is not None else ref
        ratio = torch.exp(logp - den)
        unclipped = ratio * adv
        clipped = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * adv
        policy_loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
        kl = masked_mean((logp - ref) ** 2, mask)
        self._record(batch["rewards"].float(), kl, (clipped < unclipped).detach(), mask)
        return policy_loss + self.kl_coef * kl

    def _record(self, rewards: torch.Tensor, kl: torch.Tensor, was_clipped: torch.Tensor,
                mask: torch.Tensor) -> None:
        group_std = rewards.std(-1, correction=0)
        self.metrics = {"reward_mean": rewards.mean(), "reward_std": group_std.mean(),
                        "zero_std_fraction": (group_std == 0).float().mean(),
                        "kl": kl.detach(), "clip_fraction": masked_mean(was_clipped.float(), mask)}

    def loss_weight(self, batch: Batch) -> float:
        return float(batch["loss_mask"].sum())

    def reference_models(self) -> list[nn.Module]:
        return [self.ref_model]
