"""JSON / JSONL storage: the HDF5 interface over a readable text file, for small data and tests.

`.json` holds one object: the header fields plus `streams` (key -> flat list of ids, or a list of
segments), `records` (name -> rows) and `texts` (name -> strings). `.jsonl` holds the header on
its first line and then one partial object per line (`{"streams": {...}}`, `{"records": {...}}`
or `{"texts": {...}}`); each stream piece becomes a segment, records and texts are appended.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from astrai_data.fetcher import MultiSegmentFetcher
from astrai_data.storage.base import (
    FORMAT_NAME,
    BaseStorage,
    DatasetWriter,
    StorageMeta,
    check_header,
    check_tokenizer,
    stream_dtype,
)
from astrai_data.tokenizer import TokenizerLike


def _read_objects(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such dataset file")
    text = path.read_text(encoding="utf-8")
    chunks = [(1, text)] if path.suffix == ".json" else [
        (i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    objects = []
    for line_no, chunk in chunks:
        try:
            obj = json.loads(chunk)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno if path.suffix == '.json' else line_no}: "
                             f"invalid JSON ({exc.msg}); the file is truncated or not a dataset") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        objects.append(obj)
    if not objects:
        raise ValueError(f"{path}: empty file, not an AstrAI dataset")
    return objects


def _as_segments(value: list[Any]) -> list[list[Any]]:
    return value if value and isinstance(value[0], list) else [value]


class JSONStorage(BaseStorage):
    """Reads the whole file into memory: meant for small data."""

    def load(self, load_path: str | Path, tokenizer: TokenizerLike | None = None) -> Self:
        self.path = Path(load_path)
        objects = _read_objects(self.path)
        header = objects[0]
        check_header(self.path, header)
        self.meta = StorageMeta(kind=header["kind"], keys=list(header["keys"]),
                                tokenizer_fingerprint=header.get("tokenizer_fingerprint", ""),
                                created_by=header.get("created_by", ""),
                                format_version=header["format_version"],
                                info=dict(header.get("info", {})))
        check_tokenizer(self.path, self.meta, tokenizer)
        vocab = self.meta.info.get("vocab_size")
        segments: dict[str, list[np.ndarray]] = {key: [] for key in self.meta.keys}
        records: dict[str, list[Any]] = {}
        texts: dict[str, list[str]] = {}
        for obj in objects:
            for key, value in obj.get("streams", {}).items():
                if key not in segments:
                    raise ValueError(f"{self.path}: stream '{key}' is not declared in keys")
                dtype = stream_dtype(key, vocab)
                segments[key].extend(np.asarray(s, dtype=dtype) for s in _as_segments(value) if s)
            for name, rows in obj.get("records", {}).items():
                records.setdefault(name, []).extend(rows)
            for name, values in obj.get("texts", {}).items():
                texts.setdefault(name, []).extend(values)
        self.segments = segments
        self._fetcher = MultiSegmentFetcher(segments)
        self._records = {name: np.asarray(rows) for name, rows in records.items()}
        self._texts = texts
        return self


def _header(meta: StorageMeta) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "format_version": meta.format_version, "kind": meta.kind,
            "keys": meta.keys, "tokenizer_fingerprint": meta.tokenizer_fingerprint,
            "created_by": meta.created_by, "info": meta.info}


class JSONWriter(DatasetWriter):
    """Collects content and writes `.json` (one object) or `.jsonl` (header + one line per piece)."""

    def __init__(self, path: str | Path, meta: StorageMeta) -> None:
        super().__init__(path, meta)
        if self.path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{self.path}: a JSON dataset file must end in .json or .jsonl")
        self.pieces: list[dict[str, Any]] = []

    def append(self, key: str, tokens: np.ndarray) -> None:
        if key not in self.meta.keys:
            raise KeyError(f"stream '{key}' is not declared in meta.keys {self.meta.keys}")
        self.pieces.append({"streams": {key: np.asarray(tokens).tolist()}})

    def append_records(self, name: str, rows: np.ndarray) -> None:
        self.pieces.append({"records": {name: np.asarray(rows).tolist()}})

    def append_texts(self, name: str, values: Sequence[str]) -> None:
        self.pieces.append({"texts": {name: list(values)}})

    def _write_out(self) -> None:
        # The header is written at the end so that info filled in while writing is included.
        with open(self.tmp_path, "w", encoding="utf-8") as f:
            if self.path.suffix == ".jsonl":
                for obj in [_header(self.meta), *self.pieces]:
                    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            else:
                json.dump({**_header(self.meta), **self._merged()}, f, ensure_ascii=False)

    def _merged(self) -> dict[str, Any]:
        merged: dict[str, dict[str, list[Any]]] = {"streams": {}, "records": {}, "texts": {}}
        for piece in self.pieces:
            for section, content in piece.items():
                for name, values in content.items():
                    target = merged[section].setdefault(name, [])
                    target.append(values) if section == "streams" else target.extend(values)
        return merged

    def _close_quietly(self) -> None:
        self.pieces.clear()


def save_json(path: str | Path, kind: str, streams: dict[str, Any], *,
              records: dict[str, Any] | None = None, texts: dict[str, Sequence[str]] | None = None,
              tokenizer_fingerprint: str = "", info: dict[str, Any] | None = None) -> Path:
    """Write in-memory content as a `.json`/`.jsonl` dataset; a list of arrays gives segments."""
    meta = StorageMeta(kind=kind, keys=list(streams), tokenizer_fingerprint=tokenizer_fingerprint,
                       created_by="astrai_data.save_json", info=dict(info or {}))
    with JSONWriter(path, meta) as writer:
        for key, value in streams.items():
            parts = value if isinstance(value, list | tuple) and value and not np.isscalar(value[0]) else [value]
            for part in parts:
                writer.append(key, np.asarray(part))
        for name, rows in (records or {}).items():
            writer.append_records(name, np.asarray(rows))
        for name, values in (texts or {}).items():
            writer.append_texts(name, values)
    return Path(path)
