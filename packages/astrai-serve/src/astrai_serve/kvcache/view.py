"""`KvcacheView`: the `PagedCache` of one forward over a rectangular batch: B rows of T new
tokens each, row b already holding `starts[b]` tokens. Ragged rows are padded to the longest
under an explicit mask."""

from __future__ import annotations

import torch

from astrai_serve.kvcache.storage import Storage


class KvcacheView:
    def __init__(self, storage: Storage, page_table: torch.Tensor, starts: list[int], n_new: int) -> None:
        self._storage = storage
        self._page_table = page_table  # (B, P)
        device, ps = page_table.device, storage.page_size
        B, T = len(starts), n_new
        self._total_len = max(starts) + T
        start = torch.tensor(starts, dtype=torch.long, device=device)
        self.position_ids = start[:, None] + torch.arange(T, device=device)  # (B, T)
        page = page_table.gather(1, self.position_ids // ps)
        self._slots = (page * ps + self.position_ids % ps).reshape(B * T)
        self._fresh = max(starts) == 0  # the keys are exactly this step's: gather needs no copy
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mask: torch.Tensor | None = None
        if min(starts) != max(starts):  # ragged rows: causal within each row's own length
            key_pos = torch.arange(self._total_len, device=device)
            self._mask = (key_pos[None, None, :] <= self.position_ids[:, :, None])[:, None]

    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k (B, k_heads, T, k_dim), v (B, v_heads, T, v_dim)."""
        if self._fresh:
            self._new = (k, v)
        B, _, T, _ = k.shape
        k_rows = k.transpose(1, 2).reshape(B * T, k.shape[1], k.shape[3])
        v_rows = v.transpose(1, 2).reshape(B * T, v.shape[1], v.shape[3])
        self._storage.write(layer_id, self._slots, k_rows, v_rows)

    def gather(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._new is not None:
            k, v = self._new
            self._new = None
            return k, v
        B, P = self._page_table.shape
        k, v = self._storage.gather(layer_id, self._page_table.reshape(-1))
        L = self._total_len
        k = k.view(B, P * k.shape[1], k.shape[2], k.shape[3])[:, :L].transpose(1, 2)
        v = v.view(B, P * v.shape[1], v.shape[2], v.shape[3])[:, :L].transpose(1, 2)
        return k, v

    def attention_mask(self) -> torch.Tensor | None:
        return self._mask
