"""Load balancing of mixture-of-experts models during training.

Two mechanisms, both optional (TrainConfig fields):
- the auxiliary-loss-free bias update (DeepSeek-V3, Wang et al. 2024): after every optimizer
  step each router's bias b moves by `moe_bias_update_rate` toward the experts that took fewer
  tokens than the mean, b_i += rate * sign(mean load - load_i). The bias steers the choice of
  experts only, never their weights, so balancing costs the language-model loss nothing. The
  loads are summed over the step's micro-batches and all-reduced across data-parallel ranks
  first, so every rank applies the same update and the biases stay identical everywhere;
- the auxiliary balance loss alpha * E * sum_i f_i P_i (`moe_aux_loss_coef` alpha, the mean over
  MoE layers; model/moe.py `balance_loss`), added to each micro-batch's loss.

The biases are buffers of the model, so checkpoints hold them and a resumed run continues with
exactly the routing it stopped with. Per step the logged metrics gain `moe_tokens_per_expert`
(tokens each expert took, one list per MoE layer, over all ranks), `moe_load_min_max` (the
least over the most loaded expert's tokens, averaged over layers; 1 is perfect balance),
`moe_load_min_max_worst` (the same for the worst layer) and, with the loss, `moe_aux_loss`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from astrai_core import MoE, moe_layers
from astrai_core.model.lora import has_lora
from astrai_train.parallel.wrap import all_reduce_sum

if TYPE_CHECKING:
    from astrai_train.config import TrainConfig
    from astrai_train.context import TrainContext


class ExpertBalancer:
    """The trainer's hook into a model's MoE layers: `begin_micro_batch` / `end_micro_batch`
    around each micro-batch's forward (before its backward), `step` after each update."""

    def __init__(self, layers: list[MoE], bias_update_rate: float, aux_loss_coef: float) -> None:
        if not layers:
            raise ValueError("ExpertBalancer needs a model with mixture-of-experts layers")
        self.layers = layers
        self.bias_update_rate = bias_update_rate
        self.aux_loss_coef = aux_loss_coef
        for layer in layers:
            layer.aux_loss_enabled = aux_loss_coef > 0
        self._window: torch.Tensor | None = None  # (layers, experts) tokens, int64

    def begin_micro_batch(self) -> None:
        """Forget what the layers counted outside a loss forward (e.g. an activation-checkpointed
        block recomputed in the last backward): the loads are those of the forward passes only."""
        for layer in self.layers:
            layer.take_stats()

    def end_micro_batch(self, ctx: TrainContext, share: float) -> torch.Tensor | None:
        """After the forward: add this micro-batch's loads to the step's, and return the weighted
        balance loss to add to the micro-batch's loss (None without one)."""
        stats = [layer.take_stats() for layer in self.layers]
        if any(load is None for load, _ in stats):
            return None  # no training forward ran (nothing to count)
        loads = torch.stack([load for load, _ in stats])
        self._window = loads if self._window is None else self._window + loads
        if self.aux_loss_coef <= 0:
            return None
        aux = torch.stack([a for _, a in stats]).mean()
        ctx.step_metrics["moe_aux_loss"] = (ctx.step_metrics.get("moe_aux_loss", 0.0)
                                            + aux.detach().float() * share)
        return self.aux_loss_coef * aux

    @torch.no_grad()
    def step(self, ctx: TrainContext) -> None:
        """After the optimizer step: the step's loads over all ranks, the bias update, metrics."""
        window, self._window = self._window, None
        if window is None:  # keep the collective in step with the other ranks
            n_experts = self.layers[0].gate.n_experts
            window = torch.zeros(len(self.layers), n_experts, dtype=torch.int64, device=ctx.device)
        if ctx.world_size > 1:
            replicas = ctx.world_size // ctx.sampler.world_size  # ranks that read the same samples
            window = all_reduce_sum(window) // replicas
        if self.bias_update_rate > 0:
            for layer, load in zip(self.layers, window, strict=True):
                layer.gate.update_bias(load, self.bias_update_rate)
        loads = window.double()
        ratio = loads.min(-1).values / loads.max(-1).values.clamp(min=1)
        ctx.step_metrics["moe_tokens_per_expert"] = window
        ctx.step_metrics["moe_load_min_max"] = ratio.mean()
        ctx.step_metrics["moe_load_min_max_worst"] = ratio.min()


def build_balancer(cfg: TrainConfig, model: nn.Module) -> ExpertBalancer | None:
    """The balancer of a MoE model (None for a dense one). Under LoRA the base stays as it was
    loaded: its biases are not updated (the checkpoint holds the adapter alone)."""
    layers = moe_layers(model)
    if not layers:
        if cfg.moe_aux_loss_coef > 0:
            raise ValueError("--moe-aux-loss-coef balances the experts of a mixture-of-experts "
                             "model, and this model has none (n_experts 0); drop the flag or "
                             "train a MoE model (e.g. --preset small-moe)")
        return None
    rate = 0.0 if has_lora(model) else cfg.moe_bias_update_rate
    return ExpertBalancer(layers, rate, cfg.moe_aux_loss_coef)
