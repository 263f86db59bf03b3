"""Dataset storage backends: HDF5 for real data, JSON for small data and tests."""

from __future__ import annotations

from pathlib import Path

from astrai_data.storage.base import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KINDS,
    BaseStorage,
    DatasetWriter,
    StorageMeta,
)
from astrai_data.storage.h5 import H5Storage, H5WriteConfig, H5Writer, load_h5, save_h5
from astrai_data.storage.json_storage import JSONStorage, JSONWriter, save_json
from astrai_data.tokenizer import TokenizerLike

STORAGE_TYPES: dict[str, type[BaseStorage]] = {"h5": H5Storage, "json": JSONStorage}


def storage_type_of(path: str | Path) -> str:
    """'json' for .json/.jsonl, 'h5' otherwise (the HDF5 reader explains a wrong file)."""
    return "json" if Path(path).suffix in (".json", ".jsonl") else "h5"


def open_storage(path: str | Path, tokenizer: TokenizerLike | None = None,
                 storage_type: str | None = None) -> BaseStorage:
    storage_type = storage_type or storage_type_of(path)
    if storage_type not in STORAGE_TYPES:
        raise ValueError(f"unknown storage type '{storage_type}'; expected one of "
                         f"{', '.join(STORAGE_TYPES)}")
    return STORAGE_TYPES[storage_type]().load(path, tokenizer)


def open_writer(path: str | Path, meta: StorageMeta, config: H5WriteConfig | None = None
                ) -> DatasetWriter:
    if storage_type_of(path) == "json":
        return JSONWriter(path, meta)
    return H5Writer(path, meta, config)


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "KINDS", "STORAGE_TYPES", "BaseStorage", "DatasetWriter",
    "H5Storage", "H5WriteConfig", "H5Writer", "JSONStorage", "JSONWriter", "StorageMeta",
    "load_h5", "open_storage", "open_writer", "save_h5", "save_json", "storage_type_of",
]
