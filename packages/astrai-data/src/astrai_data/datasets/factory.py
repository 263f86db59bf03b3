"""`DatasetFactory`: strategy -> dataset class, and loading a prepared file by strategy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from astrai_core.factory import BaseFactory, Registry
from astrai_data.storage import BaseStorage, open_storage
from astrai_data.tokenizer import TokenizerLike

if TYPE_CHECKING:
    from astrai_data.datasets.base import BaseDataset


class DatasetFactory(BaseFactory["BaseDataset"]):
    _registry: ClassVar[Registry] = Registry(kind="dataset strategy")

    @classmethod
    def create(cls, strategy: str, storage: BaseStorage, window_size: int | None = None,
               stride: int | None = None) -> BaseDataset:
        return cls._registry.get(strategy)(storage, window_size, stride)

    @classmethod
    def load(cls, strategy: str, load_path: str | Path, window_size: int | None = None,
             stride: int | None = None, tokenizer: TokenizerLike | None = None,
             storage_type: str | None = None) -> BaseDataset:
        """Open a prepared file and wrap it in the dataset of `strategy`; the file's kind must
        match (checked by the dataset, with the fix in the message)."""
        dataset_cls = cls._registry.get(strategy)  # unknown strategies fail before any I/O
        return dataset_cls(open_storage(load_path, tokenizer, storage_type), window_size, stride)
