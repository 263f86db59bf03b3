"""The dataset base class and helpers shared by the four strategies."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch.utils.data import Dataset

from astrai_data.storage import BaseStorage, open_storage
from astrai_data.tokenizer import TokenizerLike


def as_long(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.int64))


def as_bool(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.bool_))


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """Start of every record in its stream, plus the end of the last one."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64).ravel())])


def check_index(index: int, length: int) -> int:
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index out of range for a dataset of {length} items")
    return index


class BaseDataset(Dataset, ABC):
    """A map-style dataset over a storage. Items are dicts of tensors (see docs/contracts.md)."""

    kind: ClassVar[str] = ""

    def __init__(self, storage: BaseStorage, window_size: int | None = None,
                 stride: int | None = None) -> None:
        if storage.kind != self.kind:
            raise ValueError(f"{storage.path}: holds a '{storage.kind}' dataset, but "
                             f"{type(self).__name__} reads '{self.kind}' data; prepare it with "
                             f"`astrai data prepare --strategy {self.kind}` or train with --strategy "
                             f"{storage.kind}")
        for name, value in (("window_size", window_size), ("stride", stride)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {value}")
        self.storage = storage
        self.window_size = window_size
        self.stride = stride

    @classmethod
    def load(cls, load_path: str | Path, storage_type: str | None = None,
             tokenizer: TokenizerLike | None = None, window_size: int | None = None,
             stride: int | None = None) -> Self:
        return cls(open_storage(load_path, tokenizer, storage_type), window_size, stride)

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id recorded at preparation time (0 when unknown)."""
        pad_id = self.storage.meta.info.get("pad_id") if self.storage.meta else None
        return int(pad_id) if pad_id is not None else 0

    @property
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], Any]:
        from astrai_data.collate import collate_fn_for

        return collate_fn_for(self.kind, pad_id=self.pad_id)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any]: ...


def fit_length(ids: np.ndarray, mask: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Cut a prompt+response sequence to at most `limit` tokens, keeping the response: drop
    prompt tokens from the left first (keeping one before the response, whose label it gives),
    then response tokens from the right."""
    excess = ids.size - limit if limit is not None else 0
    if excess <= 0:
        return ids, mask
    first_target = int(np.argmax(mask)) if mask.any() else ids.size
    drop = min(excess, max(first_target - 1, 0))
    return ids[drop:drop + limit], mask[drop:drop + limit]


def shifted(ids: np.ndarray, mask: np.ndarray, prefix: str = "") -> dict[str, torch.Tensor]:
    """input_ids / labels / loss_mask of one sequence whose mask marks its target tokens."""
    tokens = as_long(ids)
    return {f"{prefix}input_ids": tokens[:-1], f"{prefix}labels": tokens[1:],
            f"{prefix}loss_mask": as_bool(mask[1:])}
