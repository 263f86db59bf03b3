"""Streaming text out of corpus files for tokenizer training, with a held-out sample on the side.

Files are read line by line and handed over in batches, so memory stays flat whatever the corpus
size. Plain text files give one text per non-empty line; `.jsonl` files give each record's
`"text"`, or the contents of its `"messages"`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BATCH_LINES = 1000  # texts per batch handed to the trainer: fewer Python-to-Rust crossings


def check_inputs(files: Sequence[Path] | Path | str) -> list[Path]:
    """The input paths, or one clear error listing every missing or unusable one."""
    if isinstance(files, str | Path):
        files = [Path(files)]
    if not files:
        raise ValueError("no input files; pass at least one text or .jsonl file with --input")
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}; check the --input paths")
    folders = [str(p) for p in paths if not p.is_file()]
    if folders:
        raise IsADirectoryError(f"input(s) are not files: {', '.join(folders)}; pass the text files inside")
    return paths


@dataclass
class HoldOut:
    """Every `every`-th text goes to `lines` instead of training, until `limit` are held."""

    every: int = 50
    limit: int = 2000
    lines: list[str] = field(default_factory=list)
    _seen: int = 0

    def take(self, text: str) -> bool:
        self._seen += 1
        if self.every <= 0 or len(self.lines) >= self.limit or self._seen % self.every:
            return False
        self.lines.append(text)
        return True


@dataclass
class CorpusStats:
    texts: int = 0
    bytes: int = 0


def iter_batches(files: Sequence[Path], hold_out: HoldOut, stats: CorpusStats,
                 on_bytes: Callable[[int], None] | None = None) -> Iterator[list[str]]:
    """Batches of training texts from `files` in order (deterministic), minus held-out ones."""
    batch: list[str] = []
    for path in files:
        for text, size in _texts(path):
            if on_bytes is not None:
                on_bytes(size)
            if not text.strip() or hold_out.take(text):
                continue
            stats.texts += 1
            stats.bytes += size
            batch.append(text)
            if len(batch) >= BATCH_LINES:
                yield batch
                batch = []
    if batch:
        yield batch


def _texts(path: Path) -> Iterator[tuple[str, int]]:
    """(text, bytes read) per line or record; blank lines give "" (skipped, but counted as read)."""
    is_jsonl = path.suffix.lower() == ".jsonl"
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{number} is not UTF-8 text ({exc.reason}); convert the file "
                                 "to UTF-8") from exc
            if not line.strip():
                yield "", len(raw)
                continue
            text = _record_text(line, path, number) if is_jsonl else line.rstrip("\r\n")
            yield text, len(raw)


def _record_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}); each line of a .jsonl "
                         "file must be one JSON object") from exc
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return "\n".join(m["content"] for m in record["messages"]
                         if isinstance(m, dict) and isinstance(m.get("content"), str))
    raise ValueError(f"{path}:{number}: expected an object with a 'text' string or a 'messages' "
                     "list; rename the field or convert the file to plain text")
