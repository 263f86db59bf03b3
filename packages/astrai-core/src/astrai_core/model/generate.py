"""A plain batched greedy decoder over the contiguous cache: the reference the serving engine is
tested against, and a simple way to sample from a model without astrai-serve."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from astrai_core.model.masks import positions_from_mask
from astrai_core.model.transformer import Transformer


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy-decode each prompt (left-padded into one batch); returns the new tokens per prompt,
    each ending at (and including) the first stop id."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs a token")
    device = model.embed_tokens.weight.device
    B, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context window max_seq_len={model.config.max_seq_len}"
        )
    ids = torch.zeros(B, width, dtype=torch.long, device=device)
    mask = torch.zeros(B, width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), device=device)
        mask[i, width - len(p) :] = True
    positions = positions_from_mask(mask)
    cache = model.make_cache(B, total)
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        cache.begin(mask)
        logits = model(ids, paged_cache=cache, position_ids=positions, logits_to_keep=1)
        next_ids = logits[:, -1].argmax(-1)
        for i in range(B):
            if not done[i]:
                out[i].append(int(next_ids[i]))
        done |= torch.isin(next_ids, stop)
        if bool(done.all()):
            break
        ids, positions = next_ids[:, None], positions[:, -1:] + 1
        mask = torch.ones(B, 1, dtype=torch.bool, device=device)
    return out
