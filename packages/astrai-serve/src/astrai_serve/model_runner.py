"""`ModelRunner`: turns a `ScheduledBatch` into one packed forward over the paged cache and
returns the logits of the rows that sample a token."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from astrai_serve.adapters import ServedAdapters
from astrai_serve.batch import ScheduledBatch
from astrai_serve.kvcache import KVCache
from astrai_serve.task import Task


class ModelRunner:
    def __init__(self, model: nn.Module, kvcache: KVCache,
                 adapters: ServedAdapters | None = None) -> None:
        self.model = model
        self.kvcache = kvcache
        self.adapters = adapters
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """(S, vocab) fp32 logits, one row per `batch.sampling_tasks()`, or None if none samples.

        All N scheduled tokens go through the model as one row (1, N), decode tokens first
        (longest first, for `PackedView`'s grouping), then the prefill chunks; lm_head runs only
        on the S rows that sample."""
        decode = sorted(batch.decode, key=lambda t: t.num_computed, reverse=True)
        ids = [t.token_ids[t.num_computed] for t in decode]
        row_of = {t.task_id: i for i, t in enumerate(decode)}
        for task, n, _ in batch.prefill:
            ids += task.token_ids[task.num_computed : task.num_computed + n]
            row_of[task.task_id] = len(ids) - 1  # its last token's hidden state samples
        view = self.kvcache.bind_packed(
            [(t.task_id, t.num_computed) for t in decode],
            [(t.task_id, t.num_computed, n) for t, n, _ in batch.prefill])
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)[None]  # (1, N)
        with self._adapters(decode, batch.prefill):
            hidden = self.model.hidden_states(input_ids, paged_cache=view,
                                              position_ids=view.position_ids)
        rows = [row_of[t.task_id] for t in batch.sampling_tasks()]
        if not rows:
            return None
        index = torch.tensor(rows, device=self.device)
        return self.model.lm_head(hidden[0].index_select(0, index)).float()  # (S, vocab)

    def _adapters(self, decode: list[Task], prefill: list[tuple[Task, int, bool]]
                  ) -> contextlib.AbstractContextManager[None]:
        """Give each packed token its request's LoRA adapter for this forward, in the order
        the tokens were packed; nothing to do when the batch is all base-model requests."""
        tasks = decode + [t for t, _, _ in prefill]
        if self.adapters is None or not any(t.adapter for t in tasks):
            return contextlib.nullcontext()
        per_task = torch.tensor([t.adapter for t in tasks])
        counts = torch.tensor([1] * len(decode) + [n for _, n, _ in prefill])
        return self.adapters.applied(per_task.repeat_interleave(counts)[None])  # (1, N)
