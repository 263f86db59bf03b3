"""The engine serves a Hugging Face Qwen3-MoE folder unchanged: greedy output equals
transformers' greedy `generate` token for token under paging, chunked prefill, the prefix cache
and preemption. Routing is per token, so a packed batch of many requests routes each of its
tokens exactly as a batch of one would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serve_helpers import EOS_ID, VOCAB, assert_no_pages_held, random_prompts

from astrai_core.model import AutoModel, Transformer
from astrai_core.model import generate as contiguous_generate
from astrai_serve import InferenceEngine, SamplingParams

transformers = pytest.importorskip("transformers")

HF_FIELDS = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    rms_norm_eps=1e-6, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
    mlp_only_layers=[0], norm_topk_prob=True,
    # Wide weights: greedy outputs vary token to token instead of repeating one near-tied argmax.
    initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=EOS_ID,
    pad_token_id=3,
)
LENGTHS = [3, 17, 1, 40, 9, 64, 33, 100]
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[EOS_ID])


def until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else ids


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen3-moe")
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**HF_FIELDS)).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe_model(moe_folder: Path) -> Transformer:
    model = AutoModel.from_pretrained(moe_folder)
    assert model.config.is_moe and model.config.n_dense_layers == 1
    return model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(LENGTHS, seed=0)


@pytest.fixture(scope="module")
def hf_reference(moe_folder, prompts) -> list[list[int]]:
    """transformers' batched greedy generate (left padding), cut after the first eos."""
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(moe_folder, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=EOS_ID, pad_token_id=3)
    reference = [until_eos(row) for row in out[:, width:].tolist()]
    assert all(len(set(r)) > 5 for r in reference if len(r) == NEW_TOKENS)  # not degenerate
    return reference


CONFIGS = {
    "default": dict(),
    "small-pages": dict(page_size=4),
    "chunked-prefill-8": dict(max_num_tokens=8, max_batch_size=4),
    "one-at-a-time": dict(max_batch_size=1),
    "preempted": dict(page_size=4, kv_cache_tokens=128),  # the longest request fits alone only
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_engine_greedy_equals_transformers(moe_model, prompts, hf_reference, config):
    with InferenceEngine(moe_model, **CONFIGS[config]) as engine:
        results = engine.generate_ids(prompts, GREEDY)
        assert [r.token_ids for r in results] == hf_reference
        if config == "preempted":
            assert engine.get_stats()["preemptions"] > 0
        assert_no_pages_held(engine)


def test_prefix_cache_hits_give_the_same_tokens(moe_model, prompts, hf_reference):
    with InferenceEngine(moe_model, page_size=4) as engine:
        first = engine.generate_ids(prompts, GREEDY)
        second = engine.generate_ids(prompts, GREEDY)
        assert [r.token_ids for r in first] == [r.token_ids for r in second] == hf_reference
        assert sum(r.cached_tokens for r in second) > 0
        assert_no_pages_held(engine)


def test_paged_equals_contiguous_cache(moe_model, prompts):
    dense = [until_eos(o) for o in contiguous_generate(moe_model, prompts, NEW_TOKENS, [EOS_ID])]
    with InferenceEngine(moe_model, page_size=8) as engine:
        assert [r.token_ids for r in engine.generate_ids(prompts, GREEDY)] == dense


def test_serving_records_no_training_statistics(moe_model, prompts):
    with InferenceEngine(moe_model) as engine:
        engine.generate_ids(prompts[:2], GREEDY)
    assert all(layer.mlp.take_stats() == (None, None) for layer in moe_model.layers[1:])
