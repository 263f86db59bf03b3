"""Multi-head latent attention (MLA, DeepSeek-V2).

Keys and values are rebuilt from a per-token latent `c_kv` (rank `kv_lora_rank`) plus one RoPE
key shared by all heads, and only those two are cached: per token and layer the cache holds
`kv_lora_rank + qk_rope_head_dim` values instead of GQA's `2 * n_kv_heads * head_dim`.

For the `1b` shape (GQA: 4 KV heads x 64 = 512 values/token/layer) against `1b-mla`
(kv_lora_rank 256 + rope 32 = 288 values/token/layer) the ratio is 288 / 512 = 0.5625.

With a cache, attention runs in latent space ("weight absorption"): the key up-projection is
folded into the query and the value up-projection applied after attention, so cached latents
are never decompressed. Without a cache (training), keys and values are materialised, which is
cheaper when every token is a query.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from astrai_core.model.attention import scaled_attention
from astrai_core.model.cache import AttentionPlan, KVSpec, PagedCache
from astrai_core.model.config import ModelConfig
from astrai_core.model.linear import Linear
from astrai_core.model.norm import RMSNorm
from astrai_core.model.rope import apply_rotary


class MLA(nn.Module):
    # Linear layers whose weight the cached decode path reads itself (kv_b_proj, absorbed into
    # the query and the output): code that swaps linear layers (serving's kernels, int8) must
    # leave these as they are.
    weights_read_directly = ("kv_b_proj",)

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        dim, H = config.dim, self.n_heads
        self.q_proj = Linear(dim, H * self.head_dim, config.attention_bias)
        self.kv_a_proj = Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, config.attention_bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim))
        self.o_proj = Linear(H * self.v_head_dim, dim, config.attention_out_bias)

    def kv_spec(self) -> KVSpec:
        return KVSpec(1, self.kv_lora_rank, 1, self.qk_rope_head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | AttentionPlan | None = None,
        paged_cache: PagedCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, nope, rope = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q = self.q_proj(x).view(B, T, H, self.head_dim).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_lora_rank, rope], dim=-1)
        c_kv = self.kv_norm(c_kv).unsqueeze(1)  # (B, 1, T, r)
        cos, sin = rotary_emb
        q_pe = apply_rotary(q_pe, cos, sin)
        k_pe = apply_rotary(k_pe.unsqueeze(1), cos, sin)  # (B, 1, T, rope)
        if paged_cache is None:
            out = self._attend_materialised(q_nope, q_pe, c_kv, k_pe, attn_mask)
        else:
            paged_cache.write(self.layer_id, c_kv, k_pe)
            c_all, k_pe_all = paged_cache.gather(self.layer_id)  # (B, 1, L, r), (B, 1, L, rope)
            out = self._attend_latent(q_nope, q_pe, c_all, k_pe_all, attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_head_dim))

    def _attend_materialised(self, q_nope, q_pe, c_kv, k_pe, attn_mask) -> torch.Tensor:
        B, H, L = q_nope.shape[0], self.n_heads, c_kv.shape[2]
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(B, L, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, H, L, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return scaled_attention(q, k, v, attn_mask, scale=self.scale)  # (B, H, T, v)

    def _attend_latent(self, q_nope, q_pe, c_all, k_pe_all, attn_mask) -> torch.Tensor:
        H, nope = self.n_heads, self.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(H, nope + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :nope], w[:, nope:]  # (H, nope, r), (H, v, r)
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        q = torch.cat([q_lat, q_pe], dim=-1)  # (B, H, T, r+rope)
        k = torch.cat([c_all, k_pe_all], dim=-1)  # (B, 1, L, r+rope)
        out_lat = scaled_attention(q, k, c_all, attn_mask, scale=self.scale)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", out_lat, w_uv)
