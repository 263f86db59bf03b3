"""Per-kind encoders: validated records in, token streams and per-record arrays out.

Encoders run in worker processes on chunks of lines and return one `EncodedChunk` per chunk
(concatenated arrays, cheap to send back), which the main process appends to the writer.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from astrai_data import layout
from astrai_data.prepare.records import (
    InvalidRecord,
    OnlinePrompt,
    PromptRecord,
    grpo_mode,
    parse_dpo,
    parse_grpo_offline,
    parse_grpo_online,
    parse_seq,
    parse_sft,
)
from astrai_data.tokenizer import TokenizerLike, encode_batch

IDS = np.uint32  # ids travel between processes as uint32; the writer narrows them if it can


@dataclass(frozen=True)
class GrpoSchema:
    """What the first valid grpo line fixed for the whole file set."""

    mode: str
    group_size: int
    source: str  # FILE:LINE of the line that set it, quoted in mismatch errors


@dataclass
class EncodedChunk:
    streams: dict[str, np.ndarray]
    records: dict[str, np.ndarray]
    texts: dict[str, list[str]]
    n_records: int
    n_tokens: int
    errors: list[tuple[int, str]] = field(default_factory=list)


class _Builder:
    """Collects one chunk's output record by record."""

    def __init__(self, keys: list[str]) -> None:
        self.streams: dict[str, list[Any]] = {key: [] for key in keys}
        self.records: dict[str, list[Any]] = defaultdict(list)
        self.texts: dict[str, list[str]] = defaultdict(list)
        self.n_records = 0
        self.n_tokens = 0

    def add(self, key: str, values: list[int]) -> None:
        self.streams[key].append(values)
        if not key.endswith("mask"):
            self.n_tokens += len(values)

    def build(self, errors: list[tuple[int, str]]) -> EncodedChunk:
        streams = {key: np.fromiter(chain.from_iterable(parts), dtype=bool if key.endswith("mask")
                                    else IDS) for key, parts in self.streams.items()}
        records = {name: np.asarray(rows) for name, rows in self.records.items()}
        return EncodedChunk(streams, records, dict(self.texts), self.n_records, self.n_tokens, errors)


def response_mask(mask: list[int]) -> list[int]:
    """Keep only the last run of target tokens: the final reply and its end-of-turn token, not
    earlier assistant turns of a multi-turn prompt."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [0] * start + [1] * (end - start) + [0] * (len(mask) - end)


class Encoder(ABC):
    keys: list[str]  # stream names this encoder writes

    def __init__(self, tokenizer: TokenizerLike, schema: GrpoSchema | None = None) -> None:
        self.tok = tokenizer
        self.schema = schema

    @abstractmethod
    def parse(self, obj: dict[str, Any]) -> Any:
        """Validate one JSON object (raises InvalidRecord)."""

    def encode(self, items: list[tuple[int, Any]]) -> EncodedChunk:
        """Encode (line, record) pairs; per-record failures become errors, not exceptions."""
        out, errors = _Builder(self.keys), []
        for line, record in items:
            try:
                self.encode_one(record, out)
                out.n_records += 1
            except InvalidRecord as exc:
                errors.append((line, str(exc)))
        return out.build(errors)

    def encode_one(self, record: Any, out: _Builder) -> None:
        raise NotImplementedError

    def reply(self, messages: list[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
        ids, mask = self.tok.apply_chat_template_with_mask(
            [*messages, {"role": "assistant", "content": response}])
        mask = response_mask(list(mask))
        if not any(mask):
            raise InvalidRecord("the rendered reply has no target tokens (check the tokenizer's "
                                "chat template)")
        return list(ids), mask


class SeqEncoder(Encoder):
    keys = layout.SEQ_KEYS
    parse = staticmethod(parse_seq)

    def encode(self, items: list[tuple[int, str]]) -> EncodedChunk:
        # One batched call: the tokenizer parallelises it, and there is no per-record Python work.
        out = _Builder(self.keys)
        eos = (self.tok.eos_id,)
        docs = encode_batch(self.tok, [text for _, text in items])
        # Parts alternate each document's ids and (eos,); build() concatenates them.
        out.streams["sequence"] = list(chain.from_iterable((ids, eos) for ids in docs))
        out.n_records = len(docs)
        out.n_tokens = sum(map(len, docs)) + len(docs)
        return out.build([])


class SFTEncoder(Encoder):
    keys = layout.SFT_KEYS
    parse = staticmethod(parse_sft)

    def encode_one(self, record: list[dict[str, str]], out: _Builder) -> None:
        ids, mask = self.tok.apply_chat_template_with_mask(record)
        if not any(mask):
            raise InvalidRecord("the rendered chat has no assistant tokens (check the tokenizer's "
                                "chat template)")
        # eos separates chats like it separates documents; predicting it is not trained.
        out.add("sequence", [*ids, self.tok.eos_id])
        out.add("loss_mask", [*mask, 0])


class DPOEncoder(Encoder):
    keys = layout.DPO_KEYS
    parse = staticmethod(parse_dpo)

    def encode_one(self, record: PromptRecord, out: _Builder) -> None:
        for side, response in zip(("chosen", "rejected"), record.responses, strict=True):
            ids, mask = self.reply(record.messages, response)
            out.add(side, ids)
            out.add(f"{side}_mask", mask)
            out.records[layout.DPO_LENGTHS[side]].append(len(ids))


class GRPOEncoder(Encoder):
    """Offline groups (scored responses) or online prompts, as the schema says."""

    def __init__(self, tokenizer: TokenizerLike, schema: GrpoSchema | None = None) -> None:
        super().__init__(tokenizer, schema)
        assert schema is not None, "grpo needs the schema probed from the first valid line"
        self.online = schema.mode == "online"
        self.keys = layout.GRPO_ONLINE_KEYS if self.online else layout.GRPO_KEYS

    def parse(self, obj: dict[str, Any]) -> PromptRecord | OnlinePrompt:
        mode = grpo_mode(obj)
        if mode != self.schema.mode:
            raise InvalidRecord(f"is an {mode} record, but {self.schema.source} made this an "
                                f"{self.schema.mode} grpo dataset; do not mix the two")
        if self.online:
            return parse_grpo_online(obj)
        record = parse_grpo_offline(obj)
        if len(record.responses) != self.schema.group_size:
            raise InvalidRecord(f"has {len(record.responses)} responses, but {self.schema.source} "
                                f"has {self.schema.group_size}; every record needs the same number")
        return record

    def encode_one(self, record: PromptRecord | OnlinePrompt, out: _Builder) -> None:
        if isinstance(record, OnlinePrompt):
            ids = self.tok.apply_chat_template(record.messages, add_generation_prompt=True,
                                               tokenize=True)
            out.add("prompt", list(ids))
            out.records[layout.GRPO_PROMPT_LENGTHS].append(len(ids))
            for name, value in (("prompt", record.prompt), ("answer", record.answer),
                                ("lang", record.lang),
                                ("messages", json.dumps(record.messages, ensure_ascii=False))):
                out.texts[name].append(value)
            return
        lengths = []
        for response in record.responses:
            ids, mask = self.reply(record.messages, response)
            out.add("sequence", ids)
            out.add("loss_mask", mask)
            lengths.append(len(ids))
        out.records[layout.GRPO_LENGTHS].append(lengths)
        out.records[layout.GRPO_REWARDS].append(np.asarray(record.rewards, np.float32))


ENCODERS: dict[str, type[Encoder]] = {
    "seq": SeqEncoder, "sft": SFTEncoder, "dpo": DPOEncoder, "grpo": GRPOEncoder,
}


def probe_schema(obj: dict[str, Any], source: str) -> GrpoSchema:
    """The grpo schema a valid line implies (raises InvalidRecord when the line is invalid)."""
    mode = grpo_mode(obj)
    if mode == "online":
        parse_grpo_online(obj)
        return GrpoSchema("online", 0, source)
    return GrpoSchema("offline", len(parse_grpo_offline(obj).responses), source)
