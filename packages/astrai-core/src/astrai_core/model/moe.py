"""Mixture-of-experts feed-forward (DeepSeek-V3 style): a router picks k of n routed SwiGLU
experts per token, shared experts run on every token, and

    y = shared(x) + sum over the k chosen experts e of w_e * expert_e(x)

Router: scores s = softmax(x W^T) or sigmoid(x W^T) in at least fp32. The experts are the top-k
of s + b, where b (`e_score_correction_bias`, DeepSeek-V3's name) is the auxiliary-loss-free
balancing bias: it steers selection only, never the weights w, which are the chosen s (divided
by their sum when `norm_topk_prob`). Training nudges b after every step from the load each
expert took (`Router.update_bias`); b is a buffer, so it travels in checkpoints and exports.

Experts: all of a layer's experts live in two stacked tensors, `gate_up_proj` (E, 2I, D) and
`down_proj` (E, D, I), so the routed tokens are computed grouped by expert: the (token, slot)
pairs are sorted by expert and each expert runs once on its contiguous block (a loop over
experts, never over tokens), with `torch._grouped_mm` in one kernel where torch has it for the
device (CUDA, bf16). Stacked weights also mean every expert gets a gradient tensor each step
(zeros where it took no token), which DDP and FSDP need.

During training (module in train mode, autograd on) each layer adds up the tokens per expert,
and when asked the auxiliary balance loss, until a trainer takes them (`take_stats`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_core.model.config import ModelConfig
from astrai_core.model.mlp import MLP

_GROUPED_MM = getattr(torch, "_grouped_mm", None)  # torch >= 2.8; absent before


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs these operands: bf16 on a CUDA GPU of compute capability
    9.0 or later (its kernels need 16-byte aligned rows). On CPU it exists but is far slower than
    one matmul per expert and has no backward, so the CPU always takes the loop."""
    if _GROUPED_MM is None or x.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    aligned = all(w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights)
    return aligned and all(t.dtype == torch.bfloat16 for t in (x, *weights))


class Router(nn.Module):
    """Token -> (weights (N, k), expert ids (N, k), scores (N, E))."""

    def __init__(self, dim: int, n_experts: int, top_k: int, scoring: str = "softmax",
                 norm_topk_prob: bool = True) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.scoring, self.norm_topk_prob = scoring, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # (N, E)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias.to(scores.dtype)  # selection only
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, experts, scores

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing: b_i += rate * sign(mean load - load_i),
        so an overloaded expert is picked less often and an idle one more. `load` (E,) is the
        tokens each expert took in the step, over every data-parallel rank."""
        bias = self.e_score_correction_bias
        load = load.to(torch.float64)
        delta = torch.sign(load.mean() - load) * rate
        bias.add_(delta.to(device=bias.device, dtype=bias.dtype))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        nn.init.zeros_(self.e_score_correction_bias)

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, top_k={self.top_k}, scoring={self.scoring}, "
                f"norm_topk_prob={self.norm_topk_prob}")


class Experts(nn.Module):
    """E SwiGLU experts stacked: expert e is down[e] (silu(gate[e] x) * up[e] x), with
    gate_up_proj[e] = [gate[e]; up[e]] (the first I rows gate, the last I rows up)."""

    def __init__(self, n_experts: int, dim: int, dim_expert: int) -> None:
        super().__init__()
        self.n_experts, self.dim_expert = n_experts, dim_expert
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * dim_expert, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, dim_expert))

    def forward(self, x: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D), experts and weights (N, k) -> (output (N, D), tokens per expert (E,))."""
        N, k = experts.shape
        flat = experts.reshape(-1)  # (N k): slot j of token t at t * k + j
        counts = torch.bincount(flat, minlength=self.n_experts)
        if N == 0:
            return x.new_zeros(x.shape), counts
        order = flat.argsort(stable=True)  # the slots grouped by expert
        # Each token repeated k times, then gathered in expert order; both steps have
        # deterministic backward (a sum over the k copies, a permutation).
        routed = x.repeat_interleave(k, dim=0).index_select(0, order)  # (N k, D)
        if grouped_mm_supported(routed, self.gate_up_proj, self.down_proj):
            out = self._grouped(routed, counts)
        else:
            out = self._looped(routed, counts)
        out = out * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(out.dtype)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out.index_select(0, inverse).view(N, k, -1).sum(1), counts

    def _looped(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs = []
        # unbind: one view per expert, whose backward stacks the E gradients once.
        pairs = zip(routed.split(counts.tolist()), self.gate_up_proj.unbind(0),
                    self.down_proj.unbind(0), strict=True)
        for chunk, gate_up, down in pairs:
            if chunk.shape[0]:
                gate, up = F.linear(chunk, gate_up).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, down))
        return torch.cat(outs)

    def _grouped(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)  # end of each expert's rows
        h = _GROUPED_MM(routed, self.gate_up_proj.transpose(-2, -1), offs=offsets)
        gate, up = h.chunk(2, dim=-1)
        return _GROUPED_MM(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=out_std)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, dim_expert={self.dim_expert}"


def balance_loss(scores: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """The auxiliary balance loss E * sum_i f_i P_i (Switch Transformer, DeepSeek's L_Bal):
    f_i the share of the batch's N k routing slots that went to expert i (not differentiable),
    P_i the mean over tokens of expert i's score normalised per token. 1 when balanced."""
    n_experts = scores.shape[-1]
    share = counts.to(scores.dtype) / max(scores.shape[0] * top_k, 1)
    probs = scores / scores.sum(-1, keepdim=True)
    return n_experts * (share * probs.mean(0)).sum()


class MoE(nn.Module):
    """The mixture-of-experts feed-forward of a `DecoderBlock` (in place of `MLP`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config.dim, config.n_experts, config.n_experts_per_token,
                           config.router_scoring, config.norm_topk_prob)
        self.experts = Experts(config.n_experts, config.dim, config.dim_expert)
        shared = config.n_shared_experts * config.dim_expert
        self.shared_experts = MLP(config.dim, shared) if shared else None
        self.aux_loss_enabled = False  # a trainer turns it on when it adds the balance loss
        self._load: torch.Tensor | None = None  # tokens per expert since the last take_stats
        self._aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D): routing is per token
        weights, experts, scores = self.gate(flat)
        out, counts = self.experts(flat, experts, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.training and torch.is_grad_enabled():
            self._record(counts, scores)
        return out.view(shape)

    def _record(self, counts: torch.Tensor, scores: torch.Tensor) -> None:
        self._load = counts if self._load is None else self._load + counts  # int64: exact
        if self.aux_loss_enabled:
            aux = balance_loss(scores, counts, self.gate.top_k)
            self._aux = aux if self._aux is None else self._aux + aux

    def take_stats(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(tokens per expert (E,), balance loss) summed over the training forwards since the
        last call (None where there was none), and start counting afresh."""
        stats = (self._load, self._aux)
        self._load = self._aux = None
        return stats


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_parameters(config: ModelConfig) -> int:
    """Parameters of one routed expert (its gate, up and down projections)."""
    return 3 * config.dim * config.dim_expert


def active_parameters(config: ModelConfig, total: int) -> int:
    """Parameters a token runs through: `total` less the routed experts it does not use
    (E - k per MoE layer). Equal to `total` for a dense model."""
    moe_layers_count = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    unused = config.n_experts - config.n_experts_per_token
    return total - moe_layers_count * unused * expert_parameters(config)
