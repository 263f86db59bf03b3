"""`PackedView`: the `PagedCache` (and `AttentionPlan`) of one engine step, with every scheduled
token packed into a single row (1, N): decode tokens first, then prefill chunks.

Packing lets the linear layers, which are most of the compute, run once per step on all N
tokens: the weights are read once, and no token is padding. Attention must not mix sequences,
so the model hands it back to this view (`attention_mask()` returns the view itself as the
plan), which runs:
- decode rows in a few groups of similar length, one SDPA each: (B_g, Hkv, rep, D) queries
  (each KV head's query heads folded into the query axis) over (B_g, Hkv, L_g, D) keys padded
  to the group's longest row under a mask; grouping by length keeps that padding small;
- each prefill chunk alone: its T queries over its L = start + T keys, causally.

Packed key axis (what `gather` returns, per layer): the decode groups' pages, B_g x P_g each,
then each prefill chunk's pages, copied from storage in one `index_select` per tensor. When the
step holds only fresh prompts (nothing cached), the keys are exactly this step's and nothing is
copied.

A decode-only step on CPU in fp32 skips both the copy and the grouping: `attend_cached` (the
`CachedAttention` seam) runs `attention.c`'s paged decode attention over each row's own pages
in storage. With one query per row, copying the pages cost more than the attention itself.
GQA goes one further through `rope_write_attend` (`RopeCachedAttention`): RoPE, the cache
write and that attention in one kernel call a layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from astrai_core.model import causal_mask
from astrai_serve import kernels
from astrai_serve.kernels.native import DecodeLayer, DecodeStep
from astrai_serve.kvcache.storage import Storage

GROUP_RATIO = 0.75  # a decode row joins a group while it needs this share of its longest row's pages


@dataclass(frozen=True)
class Segment:
    """One task's share of a step: `n_new` tokens after `start` computed ones, on `pages`."""

    pages: list[int]
    start: int
    n_new: int


@dataclass(frozen=True)
class _DecodeGroup:
    q_off: int
    rows: int
    k_off: int
    width: int  # keys per row in the packed axis (pages x page_size)
    length: int  # keys per row that attention reads (the group's longest row)
    mask: torch.Tensor | None  # (rows, 1, 1, length), None when every row is that long


@dataclass(frozen=True)
class _Chunk:
    q_off: int
    n_new: int
    k_off: int
    length: int
    mask: torch.Tensor | None  # (n_new, length) bottom-right causal, None for is_causal


def _heads_contiguous(t: torch.Tensor) -> bool:
    """(1, N, heads, dim) with each token's heads one contiguous run (a column slice of a fused
    projection qualifies)."""
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


class PackedView:
    def __init__(self, storage: Storage, decode: Sequence[Segment], prefill: Sequence[Segment]) -> None:
        """`decode` segments (one new token each) must come longest first."""
        self._storage = storage
        device = storage.device
        self._fresh = not decode and all(s.start == 0 for s in prefill)
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None
        positions, slots = self._token_layout(decode, prefill)
        self._kernels = self._decode_kernels(storage, decode, prefill)
        self._decode = decode
        self._scratch: torch.Tensor | None = None  # the kernel attention's, planned on first use
        self._splits = 1
        self._decode_step: DecodeStep | None = None  # run_decode_layer's, bound on first use
        self._step_head_dim = 0
        self._layer_scratch: torch.Tensor | None = None
        index: list[int] = []
        if self._kernels is not None:  # per-row page table (B, max_pages) and key counts
            width = max(len(s.pages) for s in decode)
            index = [p for s in decode for p in s.pages + [0] * (width - len(s.pages))]
            index += [s.start + 1 for s in decode]
            self._groups: list[_DecodeGroup] | None = None  # planned only if something gathers
            self._chunks: list[_Chunk] = []
        else:
            self._groups = self._plan_decode(decode, index)
            self._chunks = self._plan_prefill(prefill, index, q_off=len(decode))
        # One host-to-device copy for the step's index tensors, then views into it.
        n = len(positions)
        flat = torch.tensor(positions + slots + index, dtype=torch.long, device=device)
        self.position_ids = flat[:n][None]  # (1, N)
        self._slots = flat[n : 2 * n]
        if self._kernels is not None:
            self._page_table = flat[2 * n : 2 * n + n * width].view(n, width)
            self._lengths = flat[2 * n + n * width :]
        else:
            self._pages = flat[2 * n :]

    @staticmethod
    def _decode_kernels(storage: Storage, decode: Sequence[Segment], prefill: Sequence[Segment]
                        ) -> kernels.SmallBatchKernels | None:
        if prefill or not decode or storage.device.type != "cpu" or storage.dtype != torch.float32:
            return None
        return kernels.load()

    # -- layout ------------------------------------------------------------------------------
    def _token_layout(self, decode: Sequence[Segment], prefill: Sequence[Segment]
                      ) -> tuple[list[int], list[int]]:
        """Each new token's position and flat cache slot (page * page_size + offset)."""
        ps = self._storage.page_size
        positions = [s.start for s in decode]
        slots = [s.pages[s.start // ps] * ps + s.start % ps for s in decode]
        for seg in prefill:
            span = range(seg.start, seg.start + seg.n_new)
            positions += span
            slots += [seg.pages[p // ps] * ps + p % ps for p in span]
        return positions, slots

    def _plan_decode(self, decode: Sequence[Segment], pages: list[int]) -> list[_DecodeGroup]:
        ps, groups, i = self._storage.page_size, [], 0
        assert all(a.start >= b.start for a, b in pairwise(decode)), "decode: longest first"
        while i < len(decode):
            n_pages = -(-(decode[i].start + 1) // ps)
            j = i
            while j < len(decode) and -(-(decode[j].start + 1) // ps) >= GROUP_RATIO * n_pages:
                j += 1
            rows = decode[i:j]
            lengths = [s.start + 1 for s in rows]
            for s in rows:
                pages += s.pages[:n_pages] + [0] * (n_pages - min(len(s.pages), n_pages))
            mask = None
            if min(lengths) != lengths[0]:
                lens = torch.tensor(lengths, device=self._storage.device)
                mask = (torch.arange(lengths[0], device=lens.device) < lens[:, None])[:, None, None]
            groups.append(_DecodeGroup(i, j - i, (len(pages) - (j - i) * n_pages) * ps,
                                       n_pages * ps, lengths[0], mask))
            i = j
        return groups

    def _plan_prefill(self, prefill: Sequence[Segment], pages: list[int], q_off: int) -> list[_Chunk]:
        ps, chunks = self._storage.page_size, []
        for seg in prefill:
            length = seg.start + seg.n_new
            k_off = q_off if self._fresh else len(pages) * ps
            if not self._fresh:
                pages += seg.pages[: -(-length // ps)]
            mask = None
            if seg.n_new != length:  # bottom-right causal: query i sees keys up to start + i
                mask = causal_mask(seg.n_new, length, self._storage.device)
            chunks.append(_Chunk(q_off, seg.n_new, k_off, length, mask))
            q_off += seg.n_new
        return chunks

    # -- PagedCache ---------------------------------------------------------------------------
    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k (1, k_heads, N, k_dim), v (1, v_heads, N, v_dim)."""
        if self._fresh:
            self._new = (k, v)
        self._storage.write(layer_id, self._slots, k[0].transpose(0, 1), v[0].transpose(0, 1))

    def gather(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed key axis: (1, heads, keys, dim) each."""
        if self._new is not None:
            return self._new
        if self._groups is None:  # a kernel step whose model gathers anyway (MLA): plan now
            pages: list[int] = []
            self._groups = self._plan_decode(self._decode, pages)
            self._pages = torch.tensor(pages, dtype=torch.long, device=self._storage.device)
        k, v = self._storage.gather(layer_id, self._pages)
        k = k.view(1, -1, k.shape[2], k.shape[3]).transpose(1, 2)
        v = v.view(1, -1, v.shape[2], v.shape[3]).transpose(1, 2)
        return k, v

    def attention_mask(self) -> PackedView:
        return self

    # -- CachedAttention ----------------------------------------------------------------------
    def attend_cached(self, layer_id: int, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        """q (1, H, N, D) -> (1, H, N, v_dim), over the stored keys (this step's written)."""
        if self._kernels is None:
            k, v = self.gather(layer_id)
            return self.attend(q, k, v, scale)
        rows = q[0].transpose(0, 1).contiguous()  # (N, H, D): one query per decode row
        out = self._kernels.paged_decode_attention(
            rows, self._storage.k_cache[layer_id], self._storage.v_cache[layer_id], self._page_table,
            self._lengths, q.shape[-1] ** -0.5 if scale is None else scale)
        return out.transpose(0, 1)[None]

    # -- kernels.decode_block -----------------------------------------------------------------
    def run_decode_layer(self, layer: DecodeLayer, x: torch.Tensor,
                         rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """A whole `KernelDecoderBlock` over x (1, N, dim) -> (1, N, dim), this step's keys and
        values written; None (nothing written) unless this is a kernel step the kernel can run."""
        cos, sin = rotary_emb
        if self._kernels is None or x.dtype != torch.float32 or not x.is_contiguous():
            return None
        step = self._decode_step
        if (step is None or step.cos != cos.data_ptr() or step.sin != sin.data_ptr()
                or self._step_head_dim != layer.head_dim):  # bound for another layer shape
            step = self._bind_decode_step(layer, cos, sin)
            if step is None:
                return None
        need = self._kernels.decode_layer_scratch(layer, step)
        if self._layer_scratch is None or self._layer_scratch.numel() < need:  # the first layer, or a wider one
            self._layer_scratch = torch.empty(need, dtype=torch.float32)
            step.scratch = self._layer_scratch.data_ptr()
        return self._kernels.decode_layer(layer, step, x)

    def _bind_decode_step(self, layer: DecodeLayer, cos: torch.Tensor, sin: torch.Tensor) -> DecodeStep | None:
        kv, storage = self._storage.spec, self._storage
        if (cos.dtype != torch.float32 or cos.shape[-1] != layer.head_dim or not cos.is_contiguous()
                or not sin.is_contiguous() or (kv.k_heads, kv.k_dim, kv.v_heads, kv.v_dim)
                != (layer.kv_heads, layer.head_dim, layer.kv_heads, layer.head_dim)):
            return None
        rows, max_pages = self._page_table.shape
        splits = self._kernels.attention_splits(rows, max_pages)
        self._decode_step = DecodeStep(
            cos.data_ptr(), sin.data_ptr(), storage.k_cache.data_ptr(), storage.v_cache.data_ptr(),
            storage.k_cache.stride(0), storage.v_cache.stride(0), self._slots.data_ptr(),
            self._page_table.data_ptr(), self._lengths.data_ptr(), rows, storage.page_size, max_pages,
            splits, layer.head_dim ** -0.5, None, torch.get_num_threads())
        self._step_head_dim = layer.head_dim
        self._layer_scratch = None
        return self._decode_step

    # -- RopeCachedAttention -----------------------------------------------------------------
    def rope_write_attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, scale: float | None) -> torch.Tensor | None:
        """q (1, N, H, D), k (1, N, Hkv, D), v (1, N, Hkv, Dv) before RoPE -> (1, N, H, Dv);
        None (nothing written) unless this is a kernel step and the layout is the kernel's."""
        if self._kernels is None or not self._rope_layout_ok(q, k, v, cos, sin):
            return None
        h, d, dv = q.shape[2], q.shape[3], v.shape[3]
        if self._scratch is None or self._scratch.numel() < self._kernels.attention_floats(
                q.shape[1], h, d, dv, self._storage.page_size, self._page_table.shape[1], self._splits):
            # one per step, shared by the layers (a wider layer gets a bigger one)
            self._splits, self._scratch = self._kernels.attention_scratch(
                q.shape[1], h, d, dv, self._storage.page_size, self._page_table.shape[1])
        out = self._kernels.rope_decode_attention(
            layer_id, q, k, v, cos, sin, self._storage.k_cache, self._storage.v_cache, self._slots,
            self._page_table, self._lengths, q.shape[-1] ** -0.5 if scale is None else scale,
            self._splits, self._scratch)
        return out[None]

    def _rope_layout_ok(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> bool:
        kv = self._storage.spec
        return (q.dtype == k.dtype == v.dtype == cos.dtype == torch.float32 and cos.shape[-1] == q.shape[-1]
                and cos.is_contiguous() and sin.is_contiguous()
                and (k.shape[2], k.shape[3], v.shape[2], v.shape[3]) == (kv.k_heads, kv.k_dim, kv.v_heads, kv.v_dim)
                and _heads_contiguous(q) and _heads_contiguous(k) and _heads_contiguous(v))

    # -- AttentionPlan ------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """q (1, H, N, D); k/v (1, Hkv, keys, D) in the packed layout -> (1, H, N, v_dim)."""
        assert self._groups is not None, "attend() runs on keys from gather()"
        outs = [self._attend_decode(g, q, k, v, scale) for g in self._groups]
        outs += [self._attend_chunk(c, q, k, v, scale) for c in self._chunks]
        return torch.cat(outs, dim=1)[None] if len(outs) > 1 else outs[0][None]

    @staticmethod
    def _attend_decode(g: _DecodeGroup, q, k, v, scale) -> torch.Tensor:
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[3]
        qd = q[0, :, g.q_off : g.q_off + g.rows].transpose(0, 1).reshape(g.rows, Hkv, H // Hkv, D)

        def rows_of(x: torch.Tensor) -> torch.Tensor:  # (1, Hkv, rows*width, d) -> (rows, Hkv, length, d)
            block = x[0, :, g.k_off : g.k_off + g.rows * g.width].unflatten(1, (g.rows, g.width))
            return block.transpose(0, 1)[:, :, : g.length]

        out = F.scaled_dot_product_attention(qd, rows_of(k), rows_of(v), attn_mask=g.mask, scale=scale)
        return out.reshape(g.rows, H, -1).transpose(0, 1)  # (H, rows, v_dim)

    @staticmethod
    def _attend_chunk(c: _Chunk, q, k, v, scale) -> torch.Tensor:
        qc = q[:, :, c.q_off : c.q_off + c.n_new]
        kc, vc = k[:, :, c.k_off : c.k_off + c.length], v[:, :, c.k_off : c.k_off + c.length]
        out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, is_causal=c.mask is None,
                                             scale=scale, enable_gqa=kc.shape[1] != qc.shape[1])
        return out[0]  # (H, n_new, v_dim)
