"""Prefix caching through the engine: repeated and shared-prefix prompts hit and give the same
tokens as without the cache; the same tokens in another order or at another position do not."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import assert_no_pages_held, random_prompts

from astrai_core.model import Transformer, generate, get_preset
from astrai_serve import InferenceEngine, SamplingParams

PAGE = 4
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def run(engine: InferenceEngine, prompt: list[int]):
    return engine.generate_ids([prompt], GREEDY)[0]


def test_repeated_and_shared_prefix_prompts_hit(model):
    shared = random_prompts([24], seed=1)[0]  # 6 full pages
    a, b = random_prompts([5, 9], seed=2)
    with InferenceEngine(model, page_size=PAGE) as cached, \
            InferenceEngine(model, page_size=PAGE, enable_prefix_cache=False) as plain:
        assert run(cached, shared + a).cached_tokens == 0
        assert run(cached, shared + a).cached_tokens == 28  # 29 tokens: 7 pages, 1 left to compute
        hit = run(cached, shared + b)
        assert hit.cached_tokens == 24  # the shared pages only
        assert hit.token_ids == run(plain, shared + b).token_ids
        assert cached.get_stats()["prefix_hit_rate"] > 0
        assert_no_pages_held(cached)


def test_same_tokens_in_another_order_or_position_do_not_hit(model):
    pages = random_prompts([4, 4, 4], seed=5)
    with InferenceEngine(model, page_size=PAGE) as engine:
        run(engine, pages[0] + pages[1] + pages[2] + [7])
        assert run(engine, pages[1] + pages[0] + pages[2] + [7]).cached_tokens == 0  # reordered
        assert run(engine, [9] + pages[0] + pages[1] + [7]).cached_tokens == 0  # shifted by one
        assert run(engine, pages[2] + pages[1] + [7]).cached_tokens == 0  # a later page first
        assert run(engine, pages[0] + pages[2] + [7]).cached_tokens == PAGE  # only page 0 matches
        assert_no_pages_held(engine)


def test_concurrent_requests_sharing_a_prefix_stay_exact(model):
    shared = random_prompts([20], seed=7)[0]
    prompts = [shared + tail for tail in random_prompts([1, 3, 6, 2, 8], seed=8)]
    with InferenceEngine(model, page_size=PAGE, enable_prefix_cache=False) as plain:
        expected = [r.token_ids for r in plain.generate_ids(prompts, GREEDY)]
    with InferenceEngine(model, page_size=PAGE, max_num_tokens=32, max_batch_size=8) as engine:
        run(engine, shared)  # warm the shared pages
        results = engine.generate_ids(prompts, GREEDY)
        assert [r.token_ids for r in results] == expected
        assert all(r.cached_tokens == 16 or r.cached_tokens == 20 for r in results)
        assert_no_pages_held(engine)


@pytest.mark.parametrize("mla", [False, True], ids=["gqa-gated", "mla"])
def test_other_attention_layouts_serve_exactly(mla):
    """MLA caches its latent and RoPE key instead of K/V heads: Storage follows `kv_spec`."""
    extra = dict(attention_type="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=12) if mla else dict(use_gated_attention=True)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", init_std=0.2, **extra)).eval()
    prompts = random_prompts([3, 19, 8], seed=4)
    expected = generate(model, prompts, max_new_tokens=6)
    with InferenceEngine(model, page_size=PAGE) as engine:
        for _ in range(2):  # the second round reads its prompts from the prefix cache
            assert [r.token_ids for r in engine.generate_ids(prompts, GREEDY)] == expected
        assert_no_pages_held(engine)
