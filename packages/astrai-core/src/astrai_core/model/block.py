"""Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)); the feed-forward `mlp` is
the dense SwiGLU, or in the MoE layers of a mixture-of-experts config the `MoE` block."""

from __future__ import annotations

import torch
from torch import nn

from astrai_core.model.attention import GQA
from astrai_core.model.cache import AttentionPlan, PagedCache
from astrai_core.model.config import ModelConfig
from astrai_core.model.mla import MLA
from astrai_core.model.mlp import MLP
from astrai_core.model.moe import MoE
from astrai_core.model.norm import RMSNorm


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        attention_cls = MLA if config.attention_type == "mla" else GQA
        self.self_attn = attention_cls(config, layer_id)
        if config.is_moe_layer(layer_id):
            self.mlp: MLP | MoE = MoE(config)
        else:
            self.mlp = MLP(config.dim, config.dim_ffn, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | AttentionPlan | None = None,
        paged_cache: PagedCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary_emb, attention_mask, paged_cache)
        return x + self.mlp(self.post_attention_layernorm(x))
