"""CUDA: the engine in bf16 and fp16 (and fp32 against the dense reference). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import random_prompts

from astrai_core.model import AutoModel, generate
from astrai_serve import InferenceEngine, SamplingParams

pytestmark = pytest.mark.gpu


def test_cuda_fp32_equals_dense_reference(hf_folder):
    model = AutoModel.from_pretrained(hf_folder, device="cuda", dtype="float32")
    prompts = random_prompts([3, 40, 17])
    expected = generate(model, prompts, max_new_tokens=8)
    with InferenceEngine(model) as engine:
        got = engine.generate_ids(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert [r.token_ids for r in got] == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_serves(hf_folder, dtype):
    model = AutoModel.from_pretrained(hf_folder, device="cuda", dtype=dtype)
    with InferenceEngine(model) as engine:
        assert engine.kvcache.storage.k_cache.dtype == getattr(torch, dtype)
        results = engine.generate_ids(random_prompts([5, 30]), SamplingParams(max_tokens=8, ignore_eos=True))
        assert [r.generated_tokens for r in results] == [8, 8]
