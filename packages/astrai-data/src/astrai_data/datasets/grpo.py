"""GRPO records: a prompt with its G scored responses (offline), or a prompt with a reference
answer for a reward function (online)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import torch

from astrai_data.collate import pad_right
from astrai_data.datasets.base import (
    BaseDataset,
    as_long,
    check_index,
    fit_length,
    offsets_from_lengths,
    shifted,
)
from astrai_data.datasets.factory import DatasetFactory
from astrai_data.layout import (
    GRPO_KEYS,
    GRPO_LENGTHS,
    GRPO_MODE,
    GRPO_ONLINE_KEYS,
    GRPO_PROMPT_LENGTHS,
    GRPO_REWARDS,
)
from astrai_data.storage import BaseStorage


@DatasetFactory.register("grpo")
class GRPODataset(BaseDataset):
    """Offline item: input_ids, labels, loss_mask, attention_mask (G, T) and rewards (G,).
    Online item (the file holds prompts only): prompt_ids, prompt, messages, answer, lang.

    `window_size`, when given, caps each offline sequence at that many input tokens.
    """

    kind: ClassVar[str] = "grpo"

    def __init__(self, storage: BaseStorage, window_size: int | None = None,
                 stride: int | None = None) -> None:
        super().__init__(storage, window_size, stride)
        self.online = storage.meta.info.get(GRPO_MODE, "offline") == "online"
        if self.online:
            self.offsets = offsets_from_lengths(storage.records(GRPO_PROMPT_LENGTHS))
            self.group_size = 0
        else:
            self.lengths = np.asarray(storage.records(GRPO_LENGTHS), dtype=np.int64)
            self.rewards = np.asarray(storage.records(GRPO_REWARDS), dtype=np.float32)
            self.offsets = offsets_from_lengths(self.lengths)
            self.group_size = self.lengths.shape[1]
        self._len = len(self.offsets) - 1 if self.online else self.lengths.shape[0]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, self._len)
        return self._prompt(index) if self.online else self._group(index)

    def _group(self, index: int) -> dict[str, torch.Tensor]:
        g = self.group_size
        begin, end = int(self.offsets[index * g]), int(self.offsets[(index + 1) * g])
        data = self.storage.fetch(begin, end, GRPO_KEYS)
        cuts = np.cumsum(self.lengths[index])[:-1]
        limit = self.window_size + 1 if self.window_size else None
        rows = [shifted(*fit_length(ids, mask, limit)) for ids, mask in
                zip(np.split(data["sequence"], cuts), np.split(data["loss_mask"], cuts), strict=True)]
        ids = [r["input_ids"] for r in rows]
        return {"input_ids": pad_right(ids, self.pad_id),
                "labels": pad_right([r["labels"] for r in rows], self.pad_id),
                "loss_mask": pad_right([r["loss_mask"] for r in rows], False),
                "attention_mask": pad_right([torch.ones_like(t, dtype=torch.bool) for t in ids], False),
                "rewards": torch.from_numpy(self.rewards[index].copy())}

    def _prompt(self, index: int) -> dict[str, Any]:
        begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.storage.fetch(begin, end, GRPO_ONLINE_KEYS)["prompt"]
        texts = {name: self.storage.texts(name)[index] for name in ("prompt", "answer", "lang")}
        messages = json.loads(self.storage.texts("messages")[index])
        return {"prompt_ids": as_long(ids), **texts, "messages": messages}
