"""`Storage`: the K and V tensors of every layer, preallocated once as pages of `page_size` tokens.

Layout per layer is (n_pages, page_size, heads, dim): token-major, so one page of one layer is a
single contiguous block. A flat "slot" index (page * page_size + offset) addresses one token, and
a gather of whole pages viewed as (B, pages * page_size, heads, dim) and transposed is exactly the
(B, heads, L, dim) stride pattern that SDPA reads without another copy.

Nothing here grows while serving except the gather scratch buffers, which are reused across
layers and steps (fresh large allocations fault in new memory pages on every step, which costs
more than the copy itself on CPU).
"""

from __future__ import annotations

import math

import torch

from astrai_core import KVSpec


def bytes_per_page(spec: KVSpec, n_layers: int, page_size: int, dtype: torch.dtype) -> int:
    return n_layers * page_size * spec.elements_per_token() * dtype.itemsize


def pages_for_budget(
    spec: KVSpec,
    n_layers: int,
    page_size: int,
    dtype: torch.dtype,
    max_tokens: int | None = None,
    max_bytes: int | None = None,
) -> int:
    """Pages that fit a token budget or a memory budget (exactly one of the two)."""
    if (max_tokens is None) == (max_bytes is None):
        raise ValueError("size the KV cache with exactly one of a token budget or a memory budget")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValueError(f"the KV cache token budget must be positive, got {max_tokens}")
        return math.ceil(max_tokens / page_size)
    assert max_bytes is not None
    n_pages = max_bytes // bytes_per_page(spec, n_layers, page_size, dtype)
    if n_pages < 1:
        need = bytes_per_page(spec, n_layers, page_size, dtype)
        raise ValueError(f"a KV cache memory budget of {max_bytes} bytes holds no page; one page "
                         f"needs {need} bytes: raise the budget or lower page_size")
    return n_pages


class Storage:
    def __init__(
        self,
        spec: KVSpec,
        n_layers: int,
        n_pages: int,
        page_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if n_pages < 1 or page_size < 1:
            raise ValueError(f"Storage needs n_pages >= 1 and page_size >= 1, got {n_pages}, {page_size}")
        self.spec = spec
        self.n_layers = n_layers
        self.n_pages = n_pages
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        # Zeros, not empty: padded rows of a batch read real page 0 under a mask, and the
        # softmax weight 0 times a NaN left in uninitialised memory would still be NaN.
        self.k_cache = torch.zeros(n_layers, n_pages, page_size, spec.k_heads, spec.k_dim,
                                   dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(n_layers, n_pages, page_size, spec.v_heads, spec.v_dim,
                                   dtype=dtype, device=self.device)
        self._k_buf = self.k_cache.new_empty(0)
        self._v_buf = self.v_cache.new_empty(0)

    @property
    def nbytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes

    def write(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens at flat `slots` (N,): k (N, k_heads, k_dim), v (N, v_heads, v_dim)."""
        s = self.spec
        self.k_cache[layer_id].view(-1, s.k_heads, s.k_dim).index_copy_(0, slots, k)
        self.v_cache[layer_id].view(-1, s.v_heads, s.v_dim).index_copy_(0, slots, v)

    def gather(self, layer_id: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy whole pages (N,) of one layer into the scratch buffers: (N, page_size, heads, dim)
        each. The result is overwritten by the next gather."""
        n = pages.numel()
        if self._k_buf.shape[0] < n:
            self._k_buf = self.k_cache.new_empty((n, *self.k_cache.shape[2:]))
            self._v_buf = self.v_cache.new_empty((n, *self.v_cache.shape[2:]))
        k, v = self._k_buf[:n], self._v_buf[:n]
        torch.index_select(self.k_cache[layer_id], 0, pages, out=k)
        torch.index_select(self.v_cache[layer_id], 0, pages, out=v)
        return k, v
