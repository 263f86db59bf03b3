"""The seam between the model and serving: the `PagedCache` protocol, and a plain contiguous
implementation for tests and simple generation.

The model only ever calls `write`, `gather` and `attention_mask`; it never learns about pages,
tasks or schedulers. astrai-serve implements the paged version (`KvcacheView`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from astrai_core.model.masks import padded_causal_mask


@dataclass(frozen=True)
class KVSpec:
    """What one layer stores per token: `k_heads x k_dim` for K and `v_heads x v_dim` for V.

    For GQA that is the key and value heads; for MLA it is the compressed latent (as "K") and
    the shared RoPE key (as "V").
    """

    k_heads: int
    k_dim: int
    v_heads: int
    v_dim: int

    def elements_per_token(self) -> int:
        return self.k_heads * self.k_dim + self.v_heads * self.v_dim


@runtime_checkable
class AttentionPlan(Protocol):
    """A cache's own attention, for batch layouts a mask tensor cannot express cheaply (ragged
    sequences packed into one row: a block-diagonal mask would attend across all of them).
    `attention_mask()` may return one; `scaled_attention` then hands it q and the gathered k/v."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        """q (B, heads, T, dim) and k/v as this cache's `gather` returned them -> (B, heads, T, v_dim)."""
        ...


@runtime_checkable
class CachedAttention(Protocol):
    """An `AttentionPlan` that also attends straight over its cache's stored keys and values,
    reading its own pages instead of a gathered copy (serving's CPU kernels do). Only for
    attention over the stored K/V as they are (GQA); MLA transforms its keys first, so it
    gathers."""

    def attend_cached(self, layer_id: int, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        """q (B, heads, T, dim), this step's keys already written -> (B, heads, T, v_dim)."""
        ...


class RopeCachedAttention(Protocol):
    """A `CachedAttention` that also runs RoPE and the cache write itself: all of a GQA layer's
    attention after its projections in one call (serving's CPU decode kernel), instead of about
    ten small tensor ops a layer."""

    def rope_write_attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, scale: float | None) -> torch.Tensor | None:
        """q (B, T, heads, dim), k (B, T, kv_heads, dim), v (B, T, kv_heads, v_dim), before RoPE
        (half-rotation layout, cos/sin (B, T, dim)) -> (B, T, heads, v_dim), this step's keys
        and values written. None where the plan cannot (the caller then runs RoPE, `write`
        and `attend_cached` itself), having written nothing."""
        ...


@runtime_checkable
class PagedCache(Protocol):
    """Per-forward view of a KV cache for a batch of B rows with T new tokens each."""

    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this step's keys/values, shaped (B, k_heads, T, k_dim) / (B, v_heads, T, v_dim)."""
        ...

    def gather(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys/values each row may attend to, this step's included: (B, heads, L, dim)."""
        ...

    def attention_mask(self) -> torch.Tensor | AttentionPlan | None:
        """Boolean (B, 1, T, L), True where a query may attend a key; None means every row is
        dense and the T new tokens are the last T of the L keys (plain causal attention); or an
        `AttentionPlan` that attends over the cache's own layout."""
        ...


class ContiguousCache:
    """A dense (B, heads, max_seq_len, dim) cache per layer. Rows share one length; padding is
    expressed by `input_mask` in `begin` (left padding in `generate`)."""

    def __init__(
        self,
        spec: KVSpec,
        n_layers: int,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        def empty(heads: int, dim: int) -> list[torch.Tensor]:
            shape = (batch_size, heads, max_seq_len, dim)
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

        self.k, self.v = empty(spec.k_heads, spec.k_dim), empty(spec.v_heads, spec.v_dim)
        self.max_seq_len = max_seq_len
        self.length = 0  # tokens stored, this step's included once `begin` ran
        self._start = 0
        self._key_valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self._mask: torch.Tensor | None = None

    def begin(self, input_mask: torch.Tensor) -> None:
        """Announce the next T tokens of each row; input_mask (B, T) marks real tokens."""
        T = input_mask.shape[1]
        if self.length + T > self.max_seq_len:
            raise ValueError(f"ContiguousCache is full: {self.length} + {T} > max_seq_len {self.max_seq_len}")
        self._start, self.length = self.length, self.length + T
        self._key_valid[:, self._start : self.length] = input_mask.bool()
        if bool(self._key_valid[:, : self.length].all()):
            self._mask = None
            return
        self._mask = padded_causal_mask(self._key_valid[:, : self.length], T, start=self._start)

    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer_id][:, :, self._start : self.length] = k
        self.v[layer_id][:, :, self._start : self.length] = v

    def gather(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_id][:, :, : self.length], self.v[layer_id][:, :, : self.length]

    def attention_mask(self) -> torch.Tensor | None:
        return self._mask
