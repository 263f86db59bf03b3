"""Preference pairs: one record per sample, never windowed across records."""

from __future__ import annotations

from typing import ClassVar

import torch

from astrai_data.datasets.base import (
    BaseDataset,
    check_index,
    fit_length,
    offsets_from_lengths,
    shifted,
)
from astrai_data.datasets.factory import DatasetFactory
from astrai_data.layout import DPO_LENGTHS
from astrai_data.storage import BaseStorage


@DatasetFactory.register("dpo")
class DPODataset(BaseDataset):
    """Item i: prompt + chosen and prompt + rejected, masks on the response tokens only.

    `window_size`, when given, caps each side at that many input tokens (prompt cut first);
    `stride` does not apply to records.
    """

    kind: ClassVar[str] = "dpo"

    def __init__(self, storage: BaseStorage, window_size: int | None = None,
                 stride: int | None = None) -> None:
        super().__init__(storage, window_size, stride)
        self.offsets = {side: offsets_from_lengths(storage.records(name))
                        for side, name in DPO_LENGTHS.items()}
        n_chosen, n_rejected = (len(o) - 1 for o in self.offsets.values())
        if n_chosen != n_rejected:
            raise ValueError(f"{storage.path}: {n_chosen} chosen but {n_rejected} rejected "
                             "responses; the file is corrupt, prepare it again")
        self._len = n_chosen

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = check_index(index, self._len)
        limit = self.window_size + 1 if self.window_size else None
        item: dict[str, torch.Tensor] = {}
        for side, offsets in self.offsets.items():
            data = self.storage.fetch(int(offsets[index]), int(offsets[index + 1]),
                                      [side, f"{side}_mask"])
            ids, mask = fit_length(data[side], data[f"{side}_mask"], limit)
            item.update(shifted(ids, mask, prefix=f"{side}_"))
        return item
