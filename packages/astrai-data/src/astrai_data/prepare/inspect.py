"""`astrai data inspect`: what a prepared dataset file holds, with one decoded example."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astrai_data import layout
from astrai_data.datasets.base import offsets_from_lengths
from astrai_data.storage import BaseStorage, open_storage
from astrai_data.tokenizer import TokenizerLike, TokenizerSource, load_tokenizer

EXAMPLE_TOKENS = 400
ON, OFF = "[[", "]]"  # brackets around the tokens the loss counts


@dataclass
class DatasetSummary:
    path: Path
    kind: str
    format_version: int
    tokenizer_fingerprint: str
    keys: list[str]
    records: int | None
    tokens: dict[str, int]
    segments: dict[str, int]
    info: dict[str, Any]
    example: list[tuple[str, str]] = field(default_factory=list)
    """(title, rendered text) pairs; loss-masked spans are wrapped in [[ ]]."""
    decoded: bool = False


def render(ids: np.ndarray, mask: np.ndarray | None, tok: TokenizerLike | None) -> str:
    """Decode (or list) the ids, bracketing runs where the mask is on."""
    ids = np.asarray(ids)
    mask = np.zeros(ids.size, bool) if mask is None else np.asarray(mask, bool)
    cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    parts = []
    for run_ids, run_mask in zip(np.split(ids, cuts), np.split(mask, cuts), strict=True):
        if tok is not None:
            text = tok.decode(run_ids.tolist(), skip_special_tokens=False)
        else:
            text = " ".join(map(str, run_ids.tolist()))
        parts.append(f"{ON}{text}{OFF}" if run_mask.any() else text)
    return ("" if tok is not None else " ").join(parts)


def _first_document(storage: BaseStorage, eos: int) -> tuple[int, int]:
    head = storage.fetch(0, min(EXAMPLE_TOKENS, len(storage)), ["sequence"])["sequence"]
    ends = np.flatnonzero(head == eos)
    return 0, int(ends[0]) + 1 if ends.size else head.size


def _examples(storage: BaseStorage, tok: TokenizerLike | None) -> list[tuple[str, str]]:
    kind, info = storage.kind, storage.meta.info
    if kind in ("seq", "sft"):
        begin, end = _first_document(storage, int(info.get("eos_id", 0)))
        data = storage.fetch(begin, end, storage.keys())
        return [("first document" if kind == "seq" else "first chat",
                 render(data["sequence"], data.get("loss_mask"), tok))]
    if kind == "dpo":
        out = []
        for side, name in layout.DPO_LENGTHS.items():
            offsets = offsets_from_lengths(storage.records(name))
            data = storage.fetch(int(offsets[0]), int(offsets[1]), [side, f"{side}_mask"])
            out.append((f"record 0, {side}", render(data[side], data[f"{side}_mask"], tok)))
        return out
    if info.get(layout.GRPO_MODE) == "online":
        offsets = offsets_from_lengths(storage.records(layout.GRPO_PROMPT_LENGTHS))
        ids = storage.fetch(0, int(offsets[1]), ["prompt"])["prompt"]
        return [("record 0, prompt", render(ids, None, tok)),
                ("record 0, answer", storage.texts("answer")[0])]
    lengths = storage.records(layout.GRPO_LENGTHS)
    rewards = storage.records(layout.GRPO_REWARDS)
    data = storage.fetch(0, int(lengths[0][0]), layout.GRPO_KEYS)
    return [(f"record 0, response 0 of {len(lengths[0])} (reward {rewards[0][0]:g})",
             render(data["sequence"], data["loss_mask"], tok))]


def _recorded_tokenizer(storage: BaseStorage) -> TokenizerLike | None:
    hint = storage.meta.info.get("tokenizer_path")
    if not hint or not Path(hint).exists():
        return None
    try:
        return load_tokenizer(hint)
    except Exception:  # an unreadable hint only costs the decoding, never the inspection
        return None


def _tokenizer_for(storage: BaseStorage, tokenizer: TokenizerSource | None) -> TokenizerLike | None:
    """The given tokenizer, else the one recorded at preparation time if it is still there."""
    tok = load_tokenizer(tokenizer) if tokenizer is not None else _recorded_tokenizer(storage)
    fingerprint = storage.meta.tokenizer_fingerprint
    if tok is None or not fingerprint or tok.fingerprint() == fingerprint:
        return tok
    if tokenizer is not None:
        raise ValueError(f"{storage.path}: prepared with tokenizer {fingerprint[:12]}, not with "
                         f"the given one ({tok.fingerprint()[:12]})")
    return None


def _record_count(storage: BaseStorage) -> int | None:
    if "records" in storage.meta.info:
        return int(storage.meta.info["records"])
    for name in (layout.GRPO_LENGTHS, layout.GRPO_PROMPT_LENGTHS, "chosen_lengths"):
        if storage.has_records(name):
            return len(storage.records(name))
    return None


def inspect_dataset(path: str | Path, tokenizer: TokenizerSource | None = None) -> DatasetSummary:
    storage = open_storage(path)
    tok = _tokenizer_for(storage, tokenizer)
    meta = storage.meta
    return DatasetSummary(
        path=Path(path), kind=meta.kind, format_version=meta.format_version,
        tokenizer_fingerprint=meta.tokenizer_fingerprint, keys=meta.keys,
        records=_record_count(storage),
        tokens={key: storage.length(key) for key in meta.keys},
        segments={key: len(storage.fetcher.multi_fetchers[key].segments) for key in meta.keys},
        info=meta.info, example=_examples(storage, tok), decoded=tok is not None)
