"""Supervised fine-tuning: cross entropy on the assistant tokens only."""

from __future__ import annotations

import torch

from astrai_train.strategies.base import Batch
from astrai_train.strategies.factory import StrategyFactory
from astrai_train.strategies.seq import SEQStrategy


@StrategyFactory.register("sft")
class SFTStrategy(SEQStrategy):
    """L_SFT = -sum over response tokens of log P(s_t | s_<t), averaged over those tokens;
    `loss_mask` marks them (prompt and padding positions never count)."""

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        if "loss_mask" not in batch:
            raise ValueError("SFT batches need a 'loss_mask' marking the assistant tokens; "
                             "prepare the data with `astrai data prepare --strategy sft`")
        mask = batch["loss_mask"].double()  # cast where used, as SEQ's weights
        # A window without assistant tokens weighs nothing (loss 0, no gradient), never NaN.
        return self.token_loss(batch["input_ids"], batch["labels"], mask / mask.sum().clamp(min=1))

    def loss_weight(self, batch: Batch) -> float:
        return float(batch["loss_mask"].sum()) if "loss_mask" in batch else 0.0
