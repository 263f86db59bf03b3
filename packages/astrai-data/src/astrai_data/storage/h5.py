"""HDF5 storage: one self-describing file per prepared dataset.

Layout (format_version 1):
    /                       attrs: format, format_version, kind, keys, tokenizer_fingerprint,
                            created_by, info (JSON), n_tokens (JSON), complete
    /streams/<key>/<i>      segment i of stream <key>: 1-D, chunked, optionally compressed
    /segment_index/<key>    int64 length of every segment of <key>, in order
    /records/<name>         per-record arrays (first axis = records), e.g. lengths, rewards
    /texts/<name>           per-record UTF-8 strings (online GRPO prompts and answers)

Reads are lazy: only the header, segment index and per-record arrays are loaded on open; a
window read touches the one or two chunks it needs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np

from astrai_data.fetcher import MultiSegmentFetcher
from astrai_data.storage.base import (
    FORMAT_NAME,
    KINDS,
    BaseStorage,
    DatasetWriter,
    StorageMeta,
    check_header,
    check_tokenizer,
    is_mask_key,
    stream_dtype,
)
from astrai_data.tokenizer import TokenizerLike


@dataclass(frozen=True)
class H5WriteConfig:
    segment_tokens: int = 1 << 24
    """Tokens per segment dataset: bounds any one dataset's size in a 10B-token corpus."""
    chunk_tokens: int = 1 << 14
    """HDF5 chunk length: a 2048-token window touches one or two chunks."""
    compression: str | None = None
    """None, "gzip" or "lzf". Off by default: decompressing a chunk per random read costs latency."""
    buffer_tokens: int = 1 << 20
    """Tokens buffered in memory per stream before they are written (bounds writer memory)."""

    def __post_init__(self) -> None:
        if min(self.segment_tokens, self.chunk_tokens, self.buffer_tokens) < 1:
            raise ValueError("segment_tokens, chunk_tokens and buffer_tokens must be positive")
        if self.compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', not {self.compression!r}")


class _StreamWriter:
    """Appends tokens to one stream, cutting it into fixed-size resizable segment datasets."""

    def __init__(self, group: h5py.Group, dtype: np.dtype, config: H5WriteConfig) -> None:
        self.group, self.dtype, self.config = group, dtype, config
        self.lengths: list[int] = []
        self.buffer = np.empty(config.buffer_tokens, dtype=dtype)
        self.fill = 0
        self._max = np.iinfo(dtype).max if dtype.kind == "u" else None

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if self._max is not None and tokens.size and (tokens.max() > self._max or tokens.min() < 0):
            raise ValueError(f"token id out of range for {self.dtype} storage in stream "
                             f"'{self.group.name}'")
        if self.fill + tokens.size > self.buffer.size:
            self.flush()
            if tokens.size >= self.buffer.size:
                self._write(tokens.astype(self.dtype, copy=False))
                return
        self.buffer[self.fill:self.fill + tokens.size] = tokens
        self.fill += tokens.size

    def flush(self) -> None:
        self._write(self.buffer[:self.fill])
        self.fill = 0

    def _write(self, data: np.ndarray) -> None:
        seg_size = self.config.segment_tokens
        while data.size:
            if not self.lengths or self.lengths[-1] == seg_size:
                self._new_segment()
            ds, used = self.group[str(len(self.lengths) - 1)], self.lengths[-1]
            take = min(data.size, seg_size - used)
            ds.resize((used + take,))
            ds[used:used + take] = data[:take]
            self.lengths[-1] += take
            data = data[take:]

    def _new_segment(self) -> None:
        cfg = self.config
        self.group.create_dataset(
            str(len(self.lengths)), shape=(0,), maxshape=(cfg.segment_tokens,), dtype=self.dtype,
            chunks=(min(cfg.chunk_tokens, cfg.segment_tokens),), compression=cfg.compression)
        self.lengths.append(0)


class H5Writer(DatasetWriter):
    """Streams content into an HDF5 dataset file in constant memory."""

    def __init__(self, path: str | Path, meta: StorageMeta, config: H5WriteConfig | None = None
                 ) -> None:
        super().__init__(path, meta)
        self.config = config or H5WriteConfig()
        self.file = h5py.File(self.tmp_path, "w")
        vocab = meta.info.get("vocab_size")
        self.streams = {key: _StreamWriter(self.file.create_group(f"streams/{key}"),
                                           stream_dtype(key, vocab), self.config)
                        for key in meta.keys}

    def append(self, key: str, tokens: np.ndarray) -> None:
        if key not in self.streams:
            raise KeyError(f"stream '{key}' is not declared in meta.keys {self.meta.keys}")
        self.streams[key].append(tokens)

    def append_records(self, name: str, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        path = f"records/{name}"
        if path not in self.file:
            self.file.create_dataset(path, shape=(0, *rows.shape[1:]), dtype=rows.dtype,
                                     maxshape=(None, *rows.shape[1:]),
                                     chunks=(4096, *rows.shape[1:]))
        ds = self.file[path]
        n = ds.shape[0]
        ds.resize(n + rows.shape[0], axis=0)
        ds[n:] = rows

    def append_texts(self, name: str, values: Sequence[str]) -> None:
        path = f"texts/{name}"
        if path not in self.file:
            self.file.create_dataset(path, shape=(0,), maxshape=(None,), chunks=(1024,),
                                     dtype=h5py.string_dtype("utf-8"))
        ds = self.file[path]
        n = ds.shape[0]
        ds.resize((n + len(values),))
        ds[n:] = list(values)

    def _write_out(self) -> None:
        n_tokens = {}
        for key, stream in self.streams.items():
            stream.flush()
            self.file.create_dataset(f"segment_index/{key}", data=np.asarray(stream.lengths, np.int64))
            n_tokens[key] = int(sum(stream.lengths))
        attrs = self.file.attrs
        attrs.update({"format": FORMAT_NAME, "format_version": self.meta.format_version,
                      "kind": self.meta.kind, "keys": json.dumps(self.meta.keys),
                      "tokenizer_fingerprint": self.meta.tokenizer_fingerprint,
                      "created_by": self.meta.created_by, "info": json.dumps(self.meta.info),
                      "n_tokens": json.dumps(n_tokens)})
        attrs["complete"] = True  # written last: its absence marks an unfinished file
        self.file.close()

    def _close_quietly(self) -> None:
        # The file may already be closed or broken; it is deleted next anyway.
        with contextlib.suppress(Exception):
            self.file.close()


PREPARE_AGAIN = "prepare it again with `astrai data prepare`"
# What h5py raises when the structure it walks is damaged: KeyError when an object's header or
# name does not parse, OSError when a read fails its checks, UnicodeDecodeError for mangled text.
H5_READ_ERRORS = (KeyError, OSError, RuntimeError, UnicodeDecodeError)


def _corrupt(path: Path, detail: str) -> ValueError:
    return ValueError(f"{path}: not an AstrAI dataset file, or a corrupt one ({detail}); "
                      f"{PREPARE_AGAIN}")


def _reason(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.strip("'\"")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn h5py's low-level errors on a damaged file into one actionable message."""
    try:
        yield
    except FileNotFoundError:
        raise
    except H5_READ_ERRORS as exc:
        raise _corrupt(path, _reason(exc)) from None


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such dataset file") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise ValueError(f"{path}: the file is truncated ({msg.split('(')[-1].rstrip(')')}); "
                             "it was cut short, e.g. by an interrupted copy: copy or prepare it "
                             "again") from None
        if "signature" in msg:
            raise ValueError(f"{path}: not an HDF5 file, so not a prepared AstrAI dataset; "
                             "create one with `astrai data prepare`") from None
        raise _corrupt(path, f"HDF5 cannot open it: {_reason(exc)}") from None


def _read_attrs(path: Path, f: h5py.File) -> dict[str, Any]:
    with _reading(path):
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def _json_attr(path: Path, attrs: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in attrs:
        raise _corrupt(path, f"the header has no '{name}' attribute")
    try:
        value = json.loads(attrs[name])
    except (TypeError, ValueError):
        raise _corrupt(path, f"the header attribute '{name}' is not valid JSON") from None
    if not isinstance(value, kind):
        raise _corrupt(path, f"the header attribute '{name}' is not a JSON {kind.__name__}")
    return value


def _read_meta(path: Path, f: h5py.File) -> tuple[StorageMeta, dict[str, int]]:
    attrs = _read_attrs(path, f)
    check_header(path, attrs)
    if not attrs.get("complete"):
        raise ValueError(f"{path}: the dataset was not finished (its writer was interrupted); "
                         "prepare it again")
    keys = _json_attr(path, attrs, "keys", list)
    n_tokens = _json_attr(path, attrs, "n_tokens", dict)
    info = _json_attr(path, attrs, "info", dict)
    kind = str(attrs.get("kind"))
    if kind not in KINDS:
        raise _corrupt(path, f"its kind {kind!r} is not one of {', '.join(KINDS)}")
    if not keys or not all(isinstance(k, str) for k in keys):
        raise _corrupt(path, f"its stream names {keys!r} are not a list of names")
    lacking = [k for k in keys if not isinstance(n_tokens.get(k), int)]
    if lacking:
        raise _corrupt(path, f"the header has no token count for {', '.join(lacking)}")
    meta = StorageMeta(kind=kind, keys=keys,
                       tokenizer_fingerprint=str(attrs.get("tokenizer_fingerprint", "")),
                       created_by=str(attrs.get("created_by", "")),
                       format_version=int(attrs["format_version"]), info=info)
    return meta, n_tokens


def _stream_segments(path: Path, f: h5py.File, key: str, n_tokens: int) -> list[h5py.Dataset]:
    with _reading(path):
        if f"segment_index/{key}" not in f:
            raise _corrupt(path, f"the segment index of stream '{key}' is missing")
        lengths = np.asarray(f[f"segment_index/{key}"][()])
        segments = [f.get(f"streams/{key}/{i}") for i in range(lengths.size)]
        actual = [s.shape[0] if isinstance(s, h5py.Dataset) and s.ndim == 1 else None
                  for s in segments]
    if lengths.ndim != 1 or actual != lengths.tolist() or int(lengths.sum()) != n_tokens:
        raise _corrupt(path, f"stream '{key}' does not match its segment index")
    return segments


def _read_columns(path: Path, f: h5py.File) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The per-record arrays and text columns, which are small and loaded on open."""
    with _reading(path):
        records = {name: ds[()] for name, ds in f.get("records", {}).items()}
        texts = {name: ds.asstr()[()].tolist() for name, ds in f.get("texts", {}).items()}
    return records, texts


class H5Storage(BaseStorage):
    """Lazy reader of an HDF5 dataset file; reopens itself in each (forked) worker process."""

    def __init__(self) -> None:
        super().__init__()
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._n_tokens: dict[str, int] = {}

    def load(self, load_path: str | Path, tokenizer: TokenizerLike | None = None) -> Self:
        self.path = Path(load_path)
        with _open_h5(self.path) as f:
            self.meta, self._n_tokens = _read_meta(self.path, f)
            check_tokenizer(self.path, self.meta, tokenizer)
            for key in self.meta.keys:  # validates the index before any read depends on it
                _stream_segments(self.path, f, key, self._n_tokens[key])
            self._records, self._texts = _read_columns(self.path, f)
        return self

    def fetch(self, begin: int, end: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        # Open checks only the structure; damaged token chunks show up when they are read.
        fetcher = self.fetcher
        try:
            data = fetcher.key_fetch(begin, end, list(keys) if keys is not None else self.keys())
        except (OSError, RuntimeError) as exc:
            raise _corrupt(self.path, f"reading tokens [{begin}, {end}): {_reason(exc)}") from None
        self._check_ids(data, begin)
        return data

    def _check_ids(self, data: dict[str, np.ndarray], begin: int) -> None:
        """Overwritten token bytes read back as ids past the vocabulary; catch them here, with
        the file named, rather than as an index error deep inside the model."""
        vocab = self._meta().info.get("vocab_size")
        if not isinstance(vocab, int):
            return
        for key, ids in data.items():
            if not is_mask_key(key) and ids.size and int(ids.max()) >= vocab:
                at = int(np.argmax(ids >= vocab))
                raise _corrupt(self.path, f"stream '{key}' holds id {int(ids[at])} at token "
                                          f"{begin + at}, past the vocabulary of {vocab}")

    @property
    def fetcher(self) -> MultiSegmentFetcher:
        # h5py handles must not cross a fork: each process opens its own on first use.
        if self._file is None or self._pid != os.getpid():
            self._open()
        return self._fetcher

    def _open(self) -> None:
        assert self.path is not None and self.meta is not None, "load() first"
        self._file = _open_h5(self.path)
        self._pid = os.getpid()
        self.segments = {key: _stream_segments(self.path, self._file, key, self._n_tokens[key])
                         for key in self.meta.keys}
        self._fetcher = MultiSegmentFetcher(self.segments)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None, segments={})  # h5py objects do not pickle
        state.pop("_fetcher", None)
        return state


def save_h5(path: str | Path, kind: str, streams: Mapping[str, np.ndarray | Sequence[np.ndarray]],
            *, records: Mapping[str, np.ndarray] | None = None,
            texts: Mapping[str, Sequence[str]] | None = None, tokenizer_fingerprint: str = "",
            info: dict[str, Any] | None = None, config: H5WriteConfig | None = None) -> Path:
    """Write in-memory content as a dataset file (atomically). A stream given as a list of arrays
    is concatenated; segmenting follows `config.segment_tokens`."""
    meta = StorageMeta(kind=kind, keys=list(streams), tokenizer_fingerprint=tokenizer_fingerprint,
                       created_by="astrai_data.save_h5", info=dict(info or {}))
    with H5Writer(path, meta, config) as writer:
        for key, value in streams.items():
            for part in (value if isinstance(value, list | tuple) else [value]):
                writer.append(key, np.asarray(part))
        for name, rows in (records or {}).items():
            writer.append_records(name, np.asarray(rows))
        for name, values in (texts or {}).items():
            writer.append_texts(name, values)
    return Path(path)


def load_h5(path: str | Path, tokenizer: TokenizerLike | None = None) -> H5Storage:
    return H5Storage().load(path, tokenizer)
