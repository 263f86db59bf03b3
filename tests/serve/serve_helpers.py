"""Helpers shared by the serve tests (imported by name: tests/serve is on sys.path)."""

from __future__ import annotations

import torch

from astrai_serve import InferenceEngine

VOCAB = 320
EOS_ID = 0


def assert_no_pages_held(engine: InferenceEngine) -> None:
    """Page accounting after a scenario: consistent, and nothing held by a finished request."""
    engine.scheduler.call(engine.kvcache.audit)
    stats = engine.get_stats()
    assert stats["kv_pages_used"] == 0, stats
    assert stats["kv_pages_free"] + stats["kv_pages_cached"] == stats["kv_pages_total"]
    assert stats["running"] == 0 and stats["waiting"] == 0


def random_prompts(lengths: list[int], seed: int = 0, low: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=gen).tolist() for n in lengths]
