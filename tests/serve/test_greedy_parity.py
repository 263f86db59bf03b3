"""Greedy output of the engine equals transformers' greedy `generate` on the same Hugging Face
folder, token for token, under every cache and scheduling configuration."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import EOS_ID, assert_no_pages_held, random_prompts

from astrai_core.model import generate as contiguous_generate
from astrai_serve import InferenceEngine, SamplingParams

LENGTHS = [3, 17, 1, 40, 9, 64, 33, 100]
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[EOS_ID])


def until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else ids


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=0)


@pytest.fixture(scope="module")
def hf_reference(hf_model, prompts) -> list[list[int]]:
    """transformers' batched greedy generate (left padding), cut after the first eos."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=EOS_ID, pad_token_id=3)
    return [until_eos(row) for row in out[:, width:].tolist()]


def test_reference_is_not_degenerate(hf_reference):
    """Guard the guard: outputs that repeat one token would make every comparison trivial."""
    assert all(len(set(r)) > 5 for r in hf_reference if len(r) == NEW_TOKENS)


CONFIGS = {
    "default": dict(),
    "prefix-cache-off": dict(enable_prefix_cache=False),
    "small-pages": dict(page_size=4),
    "odd-page-size": dict(page_size=7),
    "chunked-prefill-8": dict(max_num_tokens=8, max_batch_size=4),
    "one-at-a-time": dict(max_batch_size=1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_engine_greedy_equals_transformers(model, prompts, hf_reference, config):
    with InferenceEngine(model, **CONFIGS[config]) as engine:
        results = engine.generate_ids(prompts, GREEDY)
        assert [r.token_ids for r in results] == hf_reference
        assert all(r.finish_reason == ("stop" if r.token_ids[-1] == EOS_ID else "length")
                   for r in results)
        assert_no_pages_held(engine)


def test_forced_preemption_gives_the_same_tokens(model, prompts, hf_reference):
    # 32 pages of 4 tokens: the longest request (124 tokens) fits alone, the batch does not.
    with InferenceEngine(model, page_size=4, kv_cache_tokens=128) as engine:
        results = engine.generate_ids(prompts, GREEDY)
        assert engine.get_stats()["preemptions"] > 0
        assert [r.token_ids for r in results] == hf_reference
        assert_no_pages_held(engine)


def test_forced_preemption_without_prefix_cache(model, prompts, hf_reference):
    with InferenceEngine(model, page_size=4, kv_cache_tokens=128, enable_prefix_cache=False) as engine:
        results = engine.generate_ids(prompts, GREEDY)
        assert engine.get_stats()["preemptions"] > 0
        assert [r.token_ids for r in results] == hf_reference
        assert_no_pages_held(engine)


def test_prefix_cache_hits_give_the_same_tokens(model, prompts, hf_reference):
    with InferenceEngine(model, page_size=4) as engine:
        first = engine.generate_ids(prompts, GREEDY)
        second = engine.generate_ids(prompts, GREEDY)  # every full prompt page is cached now
        assert [r.token_ids for r in first] == [r.token_ids for r in second] == hf_reference
        assert sum(r.cached_tokens for r in second) > 0
        assert all(r.cached_tokens == 0 for r in first)
        assert_no_pages_held(engine)


def test_paged_equals_contiguous_cache(model, prompts):
    """The core's dense-cache greedy decoder is the reference for the paged one."""
    dense = [until_eos(o) for o in contiguous_generate(model, prompts, NEW_TOKENS, [EOS_ID])]
    with InferenceEngine(model, page_size=8) as engine:
        assert [r.token_ids for r in engine.generate_ids(prompts, GREEDY)] == dense
