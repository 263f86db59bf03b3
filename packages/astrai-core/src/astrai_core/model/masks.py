"""Attention masks and position ids: the one place they are built (the model's padded batches,
the contiguous cache, plain generation and serving's packed steps all call these).

Masks are boolean, True where a query may attend a key. Queries are the last T of L keys, or,
with a cache, start at absolute position `start`: query i sits at `start + i` and sees keys
0 .. start + i ("bottom-right" causal alignment).
"""

from __future__ import annotations

import torch


def positions_from_mask(input_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of real tokens -> position ids that count only real tokens, so a left-padded
    row starts at position 0 too (padding gets 0; it is masked anyway)."""
    return (input_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_mask(T: int, L: int, device: torch.device | str | None = None,
                start: int | None = None) -> torch.Tensor:
    """(T, L): query i (absolute position start + i; default start = L - T) sees keys up to it."""
    start = L - T if start is None else start
    return torch.ones(T, L, dtype=torch.bool, device=device).tril(start)


def padded_causal_mask(key_valid: torch.Tensor, T: int, start: int = 0) -> torch.Tensor:
    """(B, 1, T, L) causal mask over the real keys of each row: `key_valid` (B, L) marks them,
    the T queries start at `start`. A query whose row has no real key before it (a padded
    query) attends to itself, so no softmax row is empty (empty rows give NaN)."""
    L = key_valid.shape[1]
    causal = causal_mask(T, L, key_valid.device, start)
    mask = causal[None] & key_valid.bool()[:, None, :]  # (B, T, L)
    diagonal = torch.arange(L, device=key_valid.device)[None, :] == \
        torch.arange(start, start + T, device=key_valid.device)[:, None]
    return (mask | diagonal[None])[:, None]
