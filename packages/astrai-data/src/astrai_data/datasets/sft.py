"""Supervised fine-tuning windows: SEQ windows plus the assistant-only loss mask."""

from __future__ import annotations

from typing import ClassVar

import torch

from astrai_data.datasets.base import as_bool, as_long
from astrai_data.datasets.factory import DatasetFactory
from astrai_data.datasets.seq import SEQDataset
from astrai_data.layout import SFT_KEYS


@DatasetFactory.register("sft")
class SFTDataset(SEQDataset):
    """The stored mask marks tokens that are targets (assistant replies and the end-of-turn token
    closing each); it is shifted with the labels, so loss_mask[t] says whether labels[t] counts."""

    kind: ClassVar[str] = "sft"
    keys: ClassVar[list[str]] = SFT_KEYS

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.window(index)
        ids = as_long(window["sequence"])
        return {"input_ids": ids[:-1], "labels": ids[1:], "loss_mask": as_bool(window["loss_mask"][1:])}
