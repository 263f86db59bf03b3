"""Helpers shared by the astrai-train tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from astrai_core import ModelConfig, Transformer

VOCAB = 64


def micro_config(**overrides: Any) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, dim=32, n_layers=2, dim_ffn=64, n_heads=4, n_kv_heads=2,
                  max_seq_len=64, use_qk_norm=True)
    return ModelConfig(**{**fields, **overrides})


def micro_model(seed: int = 0, **overrides: Any) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(micro_config(**overrides))


class DropoutLM(nn.Module):
    """A micro Transformer with dropout on its logits: training draws from the torch RNG, so
    an exact resume must restore it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.inner = micro_model(seed, tie_weight=False)
        self.config = self.inner.config
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids: torch.Tensor, input_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.dropout(self.inner(input_ids, input_mask))


def resume_config(data_path: Any, out: Any, model: nn.Module | None = None, **overrides: Any):
    """The run the resume tests interrupt: 12 samples in batches of 2 with windows of 2, so 3
    steps per epoch and 8 steps across 3 epochs, checkpoints every 3 steps, dropout in the model
    (the torch RNG matters), a cosine schedule (the scheduler state matters)."""
    from torch.utils.data import Subset

    from astrai_data import DatasetFactory
    from astrai_train import TrainConfig

    if "dataset" not in overrides:
        overrides["dataset"] = Subset(DatasetFactory.load("seq", data_path, window_size=16),
                                      range(12))
    values = dict(model=model if model is not None else DropoutLM(0),
                  batch_size=2, accumulation_steps=2, n_epoch=3, max_steps=8, ckpt_interval=3,
                  keep_last=0, log_interval=1, out=str(out), scheduler="cosine",
                  warmup_steps=2, learning_rate=1e-2, progress=False, device="cpu",
                  seed=5)
    return TrainConfig(**{**values, **overrides})


# Per gradient element of the micro model in one step: a sum over the batch's positions
# (4 samples x 16 tokens) of products that each went through 2 blocks of width <= 64, so at most
# 64 x 64 x 2 rounded operations; clipped gradients are below 1 per element.
MICRO_GRAD_TERMS = 64 * 64 * 2
