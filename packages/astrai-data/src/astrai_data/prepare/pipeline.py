"""`prepare`: JSONL inputs -> one dataset file, streamed, tokenized in worker processes."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import closing
from importlib.metadata import version
from pathlib import Path
from typing import Any

from astrai_data import layout
from astrai_data.prepare.config import PrepareConfig, PrepareReport
from astrai_data.prepare.encoders import ENCODERS, EncodedChunk, GrpoSchema, probe_schema
from astrai_data.prepare.progress import PrepareProgress
from astrai_data.prepare.records import InvalidRecord
from astrai_data.prepare.worker import Chunk, encode_chunk, init_worker, load_object, read_chunks
from astrai_data.storage import KINDS, DatasetWriter, StorageMeta, open_writer
from astrai_data.tokenizer import TokenizerLike, TokenizerSource, load_tokenizer, vocab_size

MAX_EXAMPLES = 5


def _check_paths(inputs: Sequence[str | Path], out: str | Path) -> tuple[list[Path], Path]:
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such input file")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out}: is a folder; --out takes a file path such as {out}/data.h5")
    if out.suffix not in (".h5", ".hdf5", ".json", ".jsonl"):
        raise ValueError(f"{out}: the output must end in .h5 (or .json/.jsonl for small data)")
    return paths, out


def probe_grpo(paths: Sequence[Path]) -> GrpoSchema:
    """The first valid line decides offline vs online and the group size for all inputs."""
    first_error = None
    for chunk in read_chunks(paths, chunk_lines=64):
        for offset, raw in enumerate(chunk.lines):
            if not raw.strip():
                continue
            where = f"{paths[chunk.file_index]}:{chunk.first_line + offset}"
            try:
                return probe_schema(load_object(raw), where)
            except InvalidRecord as exc:
                first_error = first_error or f"{where}: {exc}"
    raise ValueError(first_error or f"{paths[0]}: no records in the input")


def _meta(kind: str, tok: TokenizerLike, source: TokenizerSource, paths: list[Path],
          schema: GrpoSchema | None) -> StorageMeta:
    info: dict[str, Any] = {"pad_id": tok.pad_id, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
                            "vocab_size": vocab_size(tok), "sources": [p.name for p in paths]}
    if isinstance(source, str | Path):
        info["tokenizer_path"] = str(Path(source).resolve())
    keys = ENCODERS[kind].keys if kind != "grpo" else None
    if schema is not None:
        info.update({layout.GRPO_MODE: schema.mode, "group_size": schema.group_size})
        keys = layout.GRPO_ONLINE_KEYS if schema.mode == "online" else layout.GRPO_KEYS
    return StorageMeta(kind=kind, keys=list(keys), tokenizer_fingerprint=tok.fingerprint(),
                       created_by=f"astrai-data {version('astrai-data')} prepare", info=info)


def _encoded(chunks: Iterator[Chunk], init_args: tuple, config: PrepareConfig
             ) -> Iterator[tuple[Chunk, EncodedChunk]]:
    """Encoded chunks in input order, with at most `in_flight` chunks read ahead."""
    if config.workers == 0:
        init_worker(*init_args, ignore_sigint=False)
        for chunk in chunks:
            yield chunk, encode_chunk(chunk)
        return
    # fork starts workers at once and shares the loaded tokenizer; elsewhere spawn is the safe one.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with mp.get_context(method).Pool(config.workers, init_worker, init_args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(encode_chunk, (chunk,))))
            if len(pending) >= config.in_flight:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _write(writer: DatasetWriter, encoded: EncodedChunk) -> None:
    for key, tokens in encoded.streams.items():
        writer.append(key, tokens)
    for name, rows in encoded.records.items():
        writer.append_records(name, rows)
    for name, values in encoded.texts.items():
        writer.append_texts(name, values)


def prepare(kind: str, inputs: Sequence[str | Path], out: str | Path, tokenizer: TokenizerSource,
            config: PrepareConfig | None = None, *, progress: bool = False) -> PrepareReport:
    """Tokenize JSONL `inputs` into the dataset file `out` (see the package README for the input
    formats). A malformed line stops the run with FILE:LINE: reason unless
    `config.skip_invalid`; on any failure or interruption no output file is left."""
    config = config or PrepareConfig()
    if kind not in KINDS:
        raise ValueError(f"unknown kind '{kind}'; expected one of {', '.join(KINDS)}")
    paths, out = _check_paths(inputs, out)
    tok = load_tokenizer(tokenizer)
    if kind in ("seq", "sft") and tok.eos_id is None:
        raise ValueError(f"the tokenizer has no eos token, which {kind} data needs between "
                         "documents; use a tokenizer folder whose config names an eos_token")
    schema = probe_grpo(paths) if kind == "grpo" else None
    meta = _meta(kind, tok, tokenizer, paths, schema)
    report = PrepareReport(out=out, kind=kind)
    start = time.perf_counter()
    total_bytes = sum(p.stat().st_size for p in paths)
    init_args = (kind, tokenizer if isinstance(tokenizer, str | Path) else tok, schema)
    with open_writer(out, meta, config.storage) as writer, \
            PrepareProgress(total_bytes, f"prepare {kind}", progress) as bar, \
            closing(_encoded(read_chunks(paths, config.chunk_lines), init_args, config)) as results:
        for chunk, encoded in results:
            _account_errors(report, paths[chunk.file_index], encoded.errors, config.skip_invalid)
            _write(writer, encoded)
            report.records += encoded.n_records
            report.tokens += encoded.n_tokens
            bar.advance(chunk.nbytes, encoded.n_tokens)
        if report.records == 0:
            raise ValueError(f"no valid records in {', '.join(map(str, paths))}"
                             + (f" ({report.skipped} invalid lines skipped)" if report.skipped else ""))
        meta.info.update(records=report.records, tokens=report.tokens, skipped=report.skipped)
    report.seconds = time.perf_counter() - start
    return report


def _account_errors(report: PrepareReport, path: Path, errors: list[tuple[int, str]],
                    skip_invalid: bool) -> None:
    if errors and not skip_invalid:
        line, reason = errors[0]
        raise ValueError(f"{path}:{line}: {reason} (--skip-invalid, or skip_invalid=True, skips such lines)")
    report.skipped += len(errors)
    room = MAX_EXAMPLES - len(report.skipped_examples)
    report.skipped_examples += [f"{path}:{line}: {reason}" for line, reason in errors[:room]]
