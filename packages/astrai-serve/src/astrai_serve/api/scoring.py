"""Prompt scoring (`/v1/completions` with `echo` and `logprobs`): the log-probability of each
prompt token given the tokens before it, as evaluation harnesses need to rank answers by
likelihood. The first token has none (nothing predicts it): its entry is None.

The forward runs on the engine's step loop between two steps (`InferenceScheduler.call`), so it
never races the batch for the model; it computes logits a slice of positions at a time, so a
long prompt never holds (length x vocabulary) floats at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import torch

from astrai_serve.engine import InferenceEngine
from astrai_serve.request import TokenLogprob

POSITIONS_PER_SLICE = 256


def prompt_logprobs(model: torch.nn.Module, prompt: Sequence[int], top_n: int
                    ) -> list[TokenLogprob | None]:
    """[None, then for each later token its log-probability and the `top_n` most likely
    tokens at its position], from one causal forward of the whole prompt."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, T)
    out: list[TokenLogprob | None] = [None]
    with torch.inference_mode():
        hidden = model.hidden_states(ids)[0]  # (T, dim): position t predicts token t + 1
        for start in range(0, len(prompt) - 1, POSITIONS_PER_SLICE):
            end = min(start + POSITIONS_PER_SLICE, len(prompt) - 1)
            logp = model.lm_head(hidden[start:end]).float().log_softmax(-1)  # (S, V)
            targets = ids[0, start + 1 : end + 1]
            chosen = logp.gather(-1, targets[:, None]).squeeze(-1).tolist()
            top = logp.topk(top_n, dim=-1) if top_n else None
            for j, token in enumerate(targets.tolist()):
                pairs = []
                if top is not None:
                    pairs = list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True))
                out.append(TokenLogprob(token, chosen[j], pairs))
    return out


async def score_prompts(engine: InferenceEngine, prompts: Sequence[Sequence[int]], top_n: int,
                        adapter: str | None = None) -> list[list[TokenLogprob | None]]:
    """`prompt_logprobs` of each prompt, computed on the step loop (from a worker thread, so
    the event loop keeps serving while it waits its turn), under LoRA `adapter` if given."""
    top_n = min(top_n, int(engine.model.config.vocab_size))
    results: list[list[TokenLogprob | None]] = []
    adapter_id = engine.adapter_id(adapter)

    def run() -> None:
        scope = contextlib.nullcontext()
        if adapter_id and engine.adapters is not None:  # every token of the forward: one id
            scope = engine.adapters.applied(torch.tensor([adapter_id]))
        with scope:
            results.extend(prompt_logprobs(engine.model, p, top_n) for p in prompts)

    await asyncio.to_thread(engine.scheduler.call, run)
    return results
