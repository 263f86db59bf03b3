"""Reading input files in chunks of lines and encoding chunks, in worker processes or inline."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from astrai_data.prepare.encoders import ENCODERS, EncodedChunk, Encoder, GrpoSchema
from astrai_data.prepare.records import InvalidRecord
from astrai_data.tokenizer import TokenizerSource, load_tokenizer


@dataclass
class Chunk:
    file_index: int
    first_line: int  # 1-based line number of lines[0]
    lines: list[bytes]
    nbytes: int


def read_chunks(paths: Sequence[Path], chunk_lines: int) -> Iterator[Chunk]:
    """Stream the inputs as chunks of raw lines: memory stays constant whatever the file size."""
    for index, path in enumerate(paths):
        with open(path, "rb") as f:
            lines: list[bytes] = []
            first, nbytes = 1, 0
            for line_no, line in enumerate(f, start=1):
                lines.append(line)
                nbytes += len(line)
                if len(lines) == chunk_lines:
                    yield Chunk(index, first, lines, nbytes)
                    lines, first, nbytes = [], line_no + 1, 0
            if lines:
                yield Chunk(index, first, lines, nbytes)


def load_object(raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidRecord("not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidRecord(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(obj).__name__}")
    return obj


_encoder: Encoder | None = None
_init_error: BaseException | None = None


def init_worker(kind: str, tokenizer: TokenizerSource, schema: GrpoSchema | None,
                ignore_sigint: bool = True) -> None:
    """Pool initializer: one tokenizer per worker. Ctrl-C is left to the main process, which
    terminates the pool and removes the partial output."""
    global _encoder, _init_error
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _encoder = ENCODERS[kind](load_tokenizer(tokenizer), schema)
    except Exception as exc:
        # A failing Pool initializer makes the pool respawn workers forever; keep the error and
        # raise it from the first task instead, where the main process sees it.
        _init_error = exc


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    if _init_error is not None:
        raise _init_error
    assert _encoder is not None, "init_worker() first"
    valid, errors = [], []
    for offset, raw in enumerate(chunk.lines):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        line = chunk.first_line + offset
        try:
            valid.append((line, _encoder.parse(load_object(raw))))
        except InvalidRecord as exc:
            errors.append((line, str(exc)))
    encoded = _encoder.encode(valid)
    encoded.errors = sorted(errors + encoded.errors)
    return encoded
