"""The decoder-only `Transformer`: embedding, RoPE, pre-norm decoder blocks, final norm, lm_head."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from astrai_core.model.automodel import AutoModel
from astrai_core.model.block import DecoderBlock
from astrai_core.model.cache import ContiguousCache, KVSpec, PagedCache
from astrai_core.model.config import ModelConfig
from astrai_core.model.linear import Embedding, Linear
from astrai_core.model.masks import padded_causal_mask, positions_from_mask
from astrai_core.model.moe import Experts, Router
from astrai_core.model.norm import RMSNorm
from astrai_core.model.rope import RotaryEmbedding


def padding_attention_mask(input_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) mask of real tokens -> (B, 1, T, T) causal mask over real keys, or None if dense."""
    if input_mask is None or bool(input_mask.all()):
        return None
    return padded_causal_mask(input_mask, input_mask.shape[1])


@AutoModel.register("astrai")
class Transformer(AutoModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        rope_dim = config.qk_rope_head_dim if config.attention_type == "mla" else config.resolved_head_dim
        self.rotary_emb = RotaryEmbedding(rope_dim, config.max_seq_len, config.rope_theta)
        self.embed_tokens = Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = Linear(config.dim, config.vocab_size)
        if config.tie_weight:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std); residual output projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                is_out = name.endswith(("o_proj", "down_proj"))
                module.reset_parameters(out_std if is_out else std)
            elif isinstance(module, Embedding):
                module.reset_parameters(std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, Router):
                module.reset_parameters(std)
            elif isinstance(module, Experts):  # down_proj writes to the residual stream
                module.reset_parameters(std, out_std)

    def kv_spec(self) -> KVSpec:
        return self.layers[0].self_attn.kv_spec()

    def make_cache(self, batch_size: int, max_seq_len: int | None = None) -> ContiguousCache:
        p = self.embed_tokens.weight
        return ContiguousCache(self.kv_spec(), self.config.n_layers, batch_size,
                               max_seq_len or self.config.max_seq_len, p.dtype, p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        paged_cache: PagedCache | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or of the last `logits_to_keep` positions.

        `input_mask` (B, T) marks real tokens (padding is 0). With a `paged_cache`, the cache
        supplies the attention mask and `position_ids` must be given.
        """
        h = self.hidden_states(input_ids, input_mask, paged_cache, position_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        paged_cache: PagedCache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states (B, T, dim), before lm_head."""
        if position_ids is None:
            if paged_cache is not None:
                raise ValueError("position_ids are required when a paged_cache is given")
            position_ids = self._default_positions(input_ids, input_mask)
        if paged_cache is not None:
            mask = paged_cache.attention_mask()
        else:
            mask = padding_attention_mask(input_mask)
        h = self.embed_tokens(input_ids)
        rotary_emb = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, rotary_emb, mask, paged_cache, use_reentrant=False)
            else:
                h = layer(h, rotary_emb, mask, paged_cache)
        return self.norm(h)

    @staticmethod
    def _default_positions(input_ids: torch.Tensor, input_mask: torch.Tensor | None) -> torch.Tensor:
        B, T = input_ids.shape
        if input_mask is None:
            return torch.arange(T, device=input_ids.device).expand(B, T)
        return positions_from_mask(input_mask)
