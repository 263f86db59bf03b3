"""Collate functions: stack items into batches, right-padding ragged ones.

Padding follows docs/contracts.md: ids and labels are padded with the pad id, masks with False,
and every batch of token rows carries an attention mask that is True on real tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

Item = dict[str, Any]


def pad_right(tensors: Sequence[torch.Tensor], value: int | bool, length: int | None = None
              ) -> torch.Tensor:
    """Stack tensors that differ only in their last dimension, padding it on the right."""
    length = max(t.shape[-1] for t in tensors) if length is None else length
    out = torch.full((len(tensors), *tensors[0].shape[:-1], length), value, dtype=tensors[0].dtype)
    for row, t in zip(out, tensors, strict=True):
        row[..., :t.shape[-1]] = t
    return out


def _token_rows(items: Sequence[Item], prefix: str, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / labels / loss_mask (when present) / attention_mask for one group of rows."""
    ids = [item[f"{prefix}input_ids"] for item in items]
    batch = {f"{prefix}input_ids": pad_right(ids, pad_id),
             f"{prefix}labels": pad_right([item[f"{prefix}labels"] for item in items], pad_id)}
    if f"{prefix}loss_mask" in items[0]:
        batch[f"{prefix}loss_mask"] = pad_right([item[f"{prefix}loss_mask"] for item in items], False)
    batch[f"{prefix}attention_mask"] = pad_right([torch.ones_like(t, dtype=torch.bool) for t in ids],
                                                 False)
    return batch


def collate_windows(items: Sequence[Item], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """seq and sft: (B, W) input_ids, labels, [loss_mask], attention_mask."""
    return _token_rows(items, "", pad_id)


def collate_dpo(items: Sequence[Item], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """dpo: chosen_* and rejected_* rows, each right-padded to its own longest row."""
    return {**_token_rows(items, "chosen_", pad_id), **_token_rows(items, "rejected_", pad_id)}


def collate_prompts(items: Sequence[Item]) -> list[Item]:
    """grpo online: prompts stay a list of dicts; the trainer generates the responses."""
    return list(items)


def collate_grpo(items: Sequence[Item], pad_id: int = 0) -> dict[str, torch.Tensor] | list[Item]:
    """grpo: items of (G, T_i) padded to (B, G, T) and rewards (B, G); online prompts as a list."""
    if "prompt_ids" in items[0]:
        return collate_prompts(items)
    return {"input_ids": pad_right([it["input_ids"] for it in items], pad_id),
            "labels": pad_right([it["labels"] for it in items], pad_id),
            "loss_mask": pad_right([it["loss_mask"] for it in items], False),
            "attention_mask": pad_right([it["attention_mask"] for it in items], False),
            "rewards": torch.stack([it["rewards"] for it in items])}


_COLLATES: dict[str, Callable[..., Any]] = {
    "seq": collate_windows, "sft": collate_windows, "dpo": collate_dpo, "grpo": collate_grpo,
}


def collate_fn_for(kind: str, pad_id: int = 0) -> Callable[[list[Item]], Any]:
    """The collate function of a strategy, bound to a pad id (a picklable partial)."""
    if kind not in _COLLATES:
        raise ValueError(f"no collate function for '{kind}'; expected one of {', '.join(_COLLATES)}")
    return partial(_COLLATES[kind], pad_id=pad_id)
