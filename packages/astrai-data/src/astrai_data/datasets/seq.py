"""Pretraining windows over the flat token stream."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from astrai_data.datasets.base import BaseDataset, as_long, check_index
from astrai_data.datasets.factory import DatasetFactory
from astrai_data.layout import SEQ_KEYS
from astrai_data.storage import BaseStorage


@DatasetFactory.register("seq")
class SEQDataset(BaseDataset):
    """Window i covers stream tokens [i*stride, i*stride + window_size + 1): the extra token is
    the label of the last input. `stride` defaults to `window_size` (no token is input twice)."""

    kind: ClassVar[str] = "seq"
    keys: ClassVar[list[str]] = SEQ_KEYS

    def __init__(self, storage: BaseStorage, window_size: int | None = None,
                 stride: int | None = None) -> None:
        super().__init__(storage, window_size, stride)
        if window_size is None:
            raise ValueError(f"{type(self).__name__} needs window_size (tokens per training "
                             "sample), e.g. the model's max_seq_len")
        self.stride = stride or window_size
        total = storage.length(self.keys[0])
        if total < window_size + 1:
            raise ValueError(f"{storage.path}: {total} tokens are too few for one window of "
                             f"window_size={window_size} (+1 for the shifted labels); use a smaller "
                             "window or prepare more data")
        self._len = (total - window_size - 1) // self.stride + 1

    def __len__(self) -> int:
        return self._len

    def window(self, index: int) -> dict[str, np.ndarray]:
        start = check_index(index, self._len) * self.stride
        return self.storage.fetch(start, start + self.window_size + 1, self.keys)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = as_long(self.window(index)["sequence"])
        return {"input_ids": ids[:-1], "labels": ids[1:]}
