"""What every storage backend shares: the file header, the read interface and the atomic writer.

A prepared dataset holds three kinds of content:
- streams: long flat token arrays (one per key, e.g. `sequence` and `loss_mask`), stored in
  segments and read lazily through a `MultiSegmentFetcher`;
- records: small per-record arrays (lengths, rewards) loaded into memory on open;
- texts: per-record strings (prompts and reference answers for online GRPO).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from astrai_core import atomic_file
from astrai_data.fetcher import MultiSegmentFetcher
from astrai_data.tokenizer import TokenizerLike

FORMAT_NAME = "astrai-dataset"
FORMAT_VERSION = 1
KINDS = ("seq", "sft", "dpo", "grpo")


@dataclass
class StorageMeta:
    """The self-description every dataset file carries in its header."""

    kind: str
    """Train type the file was prepared for: seq, sft, dpo or grpo."""
    keys: list[str]
    """Names of the token streams, in order; aligned streams share a length."""
    tokenizer_fingerprint: str = ""
    """sha256 of the tokenizer that produced the ids ("" when unknown, e.g. synthetic tokens)."""
    created_by: str = ""
    format_version: int = FORMAT_VERSION
    info: dict[str, Any] = field(default_factory=dict)
    """Kind-specific facts: pad_id, eos_id, group_size, grpo mode, record counts, sources."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown dataset kind '{self.kind}'; expected one of {', '.join(KINDS)}")


def check_header(path: Path | str, header: Mapping[str, Any]) -> None:
    """Refuse files that are not ours or come from another format version, with the fix."""
    fmt = header.get("format")
    if fmt != FORMAT_NAME:
        raise ValueError(f"{path}: not an AstrAI dataset (format attribute is {fmt!r}, expected "
                         f"'{FORMAT_NAME}'); create one with `astrai data prepare`")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: dataset format version {version} is not supported (this "
                         f"astrai-data reads version {FORMAT_VERSION}); prepare the data again with "
                         "this version or install the astrai-data that wrote it")


def check_tokenizer(path: Path | str, meta: StorageMeta, tokenizer: TokenizerLike | None) -> None:
    """Ids are only meaningful with the tokenizer that produced them."""
    if tokenizer is None or not meta.tokenizer_fingerprint:
        return
    given = tokenizer.fingerprint()
    if given != meta.tokenizer_fingerprint:
        raise ValueError(f"{path}: prepared with tokenizer {meta.tokenizer_fingerprint[:12]}, but "
                         f"the tokenizer given has fingerprint {given[:12]}; prepare the data again "
                         "with this tokenizer (`astrai data prepare --tokenizer DIR ...`)")


class BaseStorage(ABC):
    """Read side of a prepared dataset: lazy streams, in-memory records, per-record texts."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.meta: StorageMeta | None = None
        self.segments: dict[str, list[Any]] = {}
        self._records: dict[str, np.ndarray] = {}
        self._texts: dict[str, Sequence[str]] = {}

    @abstractmethod
    def load(self, load_path: str | Path, tokenizer: TokenizerLike | None = None) -> Self:
        """Open `load_path`, check its header (and tokenizer if given), return self."""

    @property
    def fetcher(self) -> MultiSegmentFetcher:
        # Subclasses may rebuild the fetcher lazily (the HDF5 one does so after a fork).
        return self._fetcher

    @property
    def kind(self) -> str:
        return self._meta().kind

    def keys(self) -> list[str]:
        return list(self._meta().keys)

    def fetch(self, begin: int, end: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Tokens [begin, end) of each key in `keys` (default: all)."""
        return self.fetcher.key_fetch(begin, end, list(keys) if keys is not None else self.keys())

    def length(self, key: str | None = None) -> int:
        return self.fetcher.multi_fetchers[key or self.keys()[0]].total_length

    def __len__(self) -> int:
        return self.length()

    def records(self, name: str) -> np.ndarray:
        try:
            return self._records[name]
        except KeyError:
            raise KeyError(f"{self.path}: no record array '{name}' (has: "
                           f"{', '.join(self._records) or 'none'})") from None

    def texts(self, name: str) -> Sequence[str]:
        try:
            return self._texts[name]
        except KeyError:
            raise KeyError(f"{self.path}: no text column '{name}' (has: "
                           f"{', '.join(self._texts) or 'none'})") from None

    def has_records(self, name: str) -> bool:
        return name in self._records

    def _meta(self) -> StorageMeta:
        if self.meta is None:
            raise RuntimeError(f"{type(self).__name__} is not loaded; call .load(path) first")
        return self.meta


class DatasetWriter(ABC):
    """Write side: append content, then `finish()`; used as a context manager.

    Content goes to a temporary sibling that is renamed over `path` only on success, so an
    interrupted or failed write never leaves a (partial) output file behind.
    """

    def __init__(self, path: str | Path, meta: StorageMeta) -> None:
        self.path = Path(path)
        self.meta = meta
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent}: output folder does not exist")
        # Also removes what killed earlier runs left (`.NAME.tmp-PID-N` of a pid that is gone).
        self._atomic = atomic_file(self.path)
        self.tmp_path = self._atomic.path

    @abstractmethod
    def append(self, key: str, tokens: np.ndarray) -> None:
        """Append tokens to stream `key` (one of meta.keys)."""

    @abstractmethod
    def append_records(self, name: str, rows: np.ndarray) -> None:
        """Append rows to the per-record array `name` (first axis = records)."""

    @abstractmethod
    def append_texts(self, name: str, values: Sequence[str]) -> None:
        """Append one string per record to the text column `name`."""

    @abstractmethod
    def _write_out(self) -> None:
        """Flush everything into `self.tmp_path` and close it."""

    @abstractmethod
    def _close_quietly(self) -> None:
        """Release open handles after a failure."""

    def finish(self) -> Path:
        try:
            self._write_out()
        except BaseException:
            self.abort()
            raise
        return self._atomic.commit()

    def abort(self) -> None:
        self._close_quietly()
        self._atomic.discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def is_mask_key(key: str) -> bool:
    return key.endswith("mask")


def token_dtype(vocab_size: int | None) -> np.dtype:
    """uint16 halves the file for vocabularies that fit (ours are a few thousand to 65k)."""
    if vocab_size is not None and vocab_size <= np.iinfo(np.uint16).max + 1:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def stream_dtype(key: str, vocab_size: int | None) -> np.dtype:
    return np.dtype(np.bool_) if is_mask_key(key) else token_dtype(vocab_size)
