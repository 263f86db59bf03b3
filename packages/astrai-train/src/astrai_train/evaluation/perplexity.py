"""Perplexity and bits per byte of a text, JSONL or prepared HDF5 file, per language when the
records carry one.

Each document is scored on its own, conditioned on the eos token (documents in our training
data follow an eos), in windows of the model's context window that score every token once
(`rolling_windows`, as lm-eval's `loglikelihood_rolling`):

    perplexity    = exp(total NLL / total tokens)                  (depends on the tokenizer)
    bits per byte = total NLL / (ln 2 * total UTF-8 bytes)          (comparable across tokenizers)

Files: `.txt` is one document (the whole file); `.jsonl` one document per record, its "text"
field, with an optional "lang"; `.h5` (from `astrai data prepare --strategy seq`) one document
per eos-separated run of tokens, its bytes those of the decoded text.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astrai_train.evaluation.models import EvalModel
from astrai_train.evaluation.progress import RequestProgress
from astrai_train.evaluation.results import ALL, ScoreRow
from astrai_train.evaluation.scoring import rolling_windows, score_rows

SUFFIXES = (".txt", ".jsonl", ".h5", ".hdf5")


@dataclass
class Document:
    tokens: list[int]
    n_bytes: int
    lang: str = ALL


def read_texts(path: Path) -> list[tuple[str, str]]:
    """(text, language) of each document of a .txt or .jsonl file."""
    if path.suffix == ".txt":
        return [(path.read_text(encoding="utf-8"), ALL)]
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: a perplexity record needs a \"text\" string "
                                 "(and may have a \"lang\")")
            out.append((text, str(record.get("lang") or ALL)))
    return out


def _h5_documents(path: Path, tokenizer: Any) -> list[Document]:
    import numpy as np

    from astrai_data import load_h5

    storage = load_h5(path, tokenizer)  # refuses a file prepared with another tokenizer
    streams = storage.keys()
    if "sequence" not in streams:
        raise ValueError(f"{path}: a {storage.kind} file has no token stream 'sequence'; "
                         "perplexity reads seq/sft files (`astrai data prepare --strategy seq`)")
    ids = storage.fetch(0, storage.length("sequence"), ["sequence"])["sequence"]
    eos = tokenizer.eos_id
    cuts = np.flatnonzero(ids == eos) if eos is not None else np.array([], dtype=int)
    docs, start = [], 0
    for end in [*cuts.tolist(), len(ids)]:
        tokens = ids[start:end].tolist()
        if tokens:
            docs.append(Document(tokens, len(tokenizer.decode(tokens).encode("utf-8"))))
        start = end + 1
    return docs


def load_documents(path: Path, tokenizer: Any) -> list[Document]:
    if not path.is_file():
        raise FileNotFoundError(f"--tasks {path}: file not found")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"--tasks {path}: perplexity reads {', '.join(SUFFIXES)} files")
    if path.suffix in (".h5", ".hdf5"):
        return _h5_documents(path, tokenizer)
    docs = [Document(list(tokenizer.encode(text)), len(text.encode("utf-8")), lang)
            for text, lang in read_texts(path)]
    return [d for d in docs if d.tokens]


class PerplexityTask:
    kind = "perplexity"

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return f"ppl:{self.path.name}"

    def prepare(self) -> None:
        """Read the file once before any model loads: a bad record fails now."""
        if not self.path.is_file():
            raise FileNotFoundError(f"--tasks {self.path}: file not found")
        if self.path.suffix not in SUFFIXES:
            raise ValueError(f"--tasks {self.path}: perplexity reads {', '.join(SUFFIXES)} files")
        if self.path.suffix in (".h5", ".hdf5"):
            from astrai_data import load_h5

            load_h5(self.path).close()
        elif not any(text for text, _ in read_texts(self.path)):
            raise ValueError(f"--tasks {self.path}: no text to score")

    def run(self, model: EvalModel, progress: RequestProgress
            ) -> tuple[list[ScoreRow], dict[str, Any], dict[str, float]]:
        start = time.perf_counter()
        docs = load_documents(self.path, model.tokenizer)
        if not docs:
            raise ValueError(f"--tasks {self.path}: no text to score")
        totals = perplexity(model, docs, progress)
        rows = [ScoreRow(self.name, "ppl", lang, math.exp(t["nll"] / t["tokens"]), None,
                         int(t["docs"])) for lang, t in totals.items()]
        rows += [ScoreRow(self.name, "bpb", lang, t["nll"] / (math.log(2) * t["bytes"]), None,
                          int(t["docs"])) for lang, t in totals.items()]
        return rows, {self.name: totals}, {self.name: time.perf_counter() - start}


def perplexity(model: EvalModel, docs: list[Document], progress: RequestProgress | None = None
               ) -> dict[str, dict[str, float]]:
    """language -> {nll, tokens, bytes, docs}, with "all" over every document."""
    prefix = model.tokenizer.eos_id
    if prefix is None:
        raise ValueError("perplexity conditions each document on the eos token, and this "
                         "tokenizer names none; set eos_token in tokenizer_config.json")
    rows, owner = [], []
    for d, doc in enumerate(docs):
        for row in rolling_windows(doc.tokens, prefix, model.max_seq_len):
            rows.append(row)
            owner.append(d)
    nll = [0.0] * len(docs)
    progress = progress or RequestProgress(enabled=False)
    with progress.track("perplexity", len(rows), unit="windows") as advance:
        for d, score in zip(owner, score_rows(model.model, rows, advance=advance), strict=True):
            nll[d] -= score.logprob
    totals: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(
        ("nll", "tokens", "bytes", "docs"), 0.0))
    for doc, value in zip(docs, nll, strict=True):
        for lang in dict.fromkeys((ALL, doc.lang)):
            t = totals[lang]
            t["nll"] += value
            t["tokens"] += len(doc.tokens)
            t["bytes"] += doc.n_bytes
            t["docs"] += 1
    return dict(totals)
