"""Grouped-query attention (GQA) with optional qk-norm (Qwen3) and a sigmoid output gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astrai_core.model.cache import AttentionPlan, KVSpec, PagedCache
from astrai_core.model.config import ModelConfig
from astrai_core.model.fusion import fused_linear
from astrai_core.model.linear import Linear
from astrai_core.model.masks import causal_mask
from astrai_core.model.norm import RMSNorm
from astrai_core.model.rope import apply_rotary


def scaled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | AttentionPlan | None,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA over q (B, H, T, D) and k/v (B, Hkv, L, D) where Hkv divides H.

    `mask` None means the T queries are the last T of the L keys, causally; an `AttentionPlan`
    (from a paged cache) does the attention itself.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        return mask.attend(q, k, v, scale)
    T, L = q.shape[-2], k.shape[-2]
    is_causal = False
    if mask is None and T > 1:
        if T == L:
            is_causal = True
        else:  # causal aligned to the bottom right: query i sees keys up to L - T + i
            mask = causal_mask(T, L, q.device)
    if k.shape[1] != q.shape[1] and T == 1:
        # Decode: fold each group's query heads into the query axis, (B, Hkv, rep, D), so the
        # cached keys are read once per KV head instead of being copied rep times.
        B, H, _, D = q.shape
        out = F.scaled_dot_product_attention(
            q.reshape(B, k.shape[1], H // k.shape[1], D), k, v, attn_mask=mask, scale=scale
        )
        return out.reshape(B, H, 1, v.shape[-1])
    # SDPA broadcasts each KV head over its query group itself (no copies of K/V).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class GQA(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.resolved_head_dim
        dim, hd = config.dim, self.head_dim
        self.q_proj = Linear(dim, self.n_heads * hd, config.attention_bias)
        self.k_proj = Linear(dim, self.n_kv_heads * hd, config.attention_bias)
        self.v_proj = Linear(dim, self.n_kv_heads * hd, config.attention_bias)
        self.o_proj = Linear(self.n_heads * hd, dim, config.attention_out_bias)
        self.q_norm = RMSNorm(hd, config.norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(hd, config.norm_eps) if config.use_qk_norm else None
        self.g_proj = Linear(dim, self.n_heads * hd) if config.use_gated_attention else None
        self.qkv_proj: Linear | None = None  # serving only: q, k, v (and g) in one product
        self._qkv_sizes: list[int] = []  # its output split back into q, k, v (and g)

    def fuse_projections(self) -> bool:
        """Replace q/k/v (and g) by one `qkv_proj` (serving; `astrai_core.model.fusion`)."""
        parts = [self.q_proj, self.k_proj, self.v_proj] + ([self.g_proj] if self.g_proj is not None else [])
        fused = fused_linear(parts)
        if fused is None:
            return False
        self._qkv_sizes = [p.out_features for p in parts]
        self.qkv_proj, self.q_proj, self.k_proj, self.v_proj, self.g_proj = fused, None, None, None, None
        return True

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q, k, v, g or None), each (B, T, features)."""
        if self.qkv_proj is not None:
            q, k, v, *g = self.qkv_proj(x).split(self._qkv_sizes, dim=-1)
            return q, k, v, (g[0] if g else None)
        g = self.g_proj(x) if self.g_proj is not None else None
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), g

    def kv_spec(self) -> KVSpec:
        return KVSpec(self.n_kv_heads, self.head_dim, self.n_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | AttentionPlan | None = None,
        paged_cache: PagedCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v, gate = self._project(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head norm, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rotary_emb
        out = None
        # The cache protocols are checked by their methods: isinstance on a runtime Protocol
        # costs ~10 us (measured), paid per layer per step.
        rope_write_attend = getattr(attn_mask, "rope_write_attend", None) if paged_cache is not None else None
        if rope_write_attend is not None:  # `RopeCachedAttention`: (B, T, H, Dv)
            out = rope_write_attend(self.layer_id, q, k, v, cos, sin, None)
        if out is None:
            out = self._rope_attend(q, k, v, cos, sin, attn_mask, paged_cache)
        out = out.reshape(B, T, self.n_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)

    def _rope_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, attn_mask: torch.Tensor | AttentionPlan | None,
                     paged_cache: PagedCache | None) -> torch.Tensor:
        """q/k/v (B, T, heads, dim) before RoPE -> (B, T, H, Dv)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if paged_cache is None:
            out = scaled_attention(q, k, v, attn_mask)
        else:
            paged_cache.write(self.layer_id, k, v)
            attend_cached = getattr(attn_mask, "attend_cached", None)  # `CachedAttention`
            if attend_cached is not None:
                out = attend_cached(self.layer_id, q, None)
            else:
                k, v = paged_cache.gather(self.layer_id)  # (B, Hkv, L, D)
                out = scaled_attention(q, k, v, attn_mask)
        return out.transpose(1, 2)
