"""Logits parity with Hugging Face transformers for llama, qwen2 and qwen3 folders."""

from __future__ import annotations

import pytest
import torch

from astrai_core.model import AutoModel
from tolerances import forward_bound

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            max_position_embeddings=128, rms_norm_eps=1e-6)

CASES = {
    # name: (config class, model class, extra config fields)
    "llama-mha-untied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa2-tied-1e6": ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 rope_theta=1e6)),
    "llama-gqa4-bias": ("LlamaConfig", "LlamaForCausalLM",
                        dict(num_attention_heads=8, num_key_value_heads=2, attention_bias=True,
                             mlp_bias=True, tie_word_embeddings=False)),
    "qwen2-gqa2": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        rope_theta=1e6)),
    "qwen3-gqa4-headdim": ("Qwen3Config", "Qwen3ForCausalLM",
                           dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24,
                                tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3-mha-tied": ("Qwen3Config", "Qwen3ForCausalLM",
                       dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                            tie_word_embeddings=True)),
}


def make_hf_model(name: str, folder):
    config_cls, model_cls, extra = CASES[name]
    fields = dict(BASE, **extra)
    if "rope_theta" in fields:  # transformers 5 reads rope parameters from one dict
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random biases and norm weights, so every parameter matters
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.normal_(0.0, 0.3).add_(1.0 if "norm" in pname else 0.0)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(request.param, folder)
    ours = AutoModel.from_pretrained(folder)
    return hf_model, ours


def _bound(expected: torch.Tensor) -> float:
    """fp32, the dtype both run in: transformers computes RMSNorm and RoPE in fp32 even for an
    fp64 model, so fp64 would not be a cleaner reference. The bound is the worst case of
    tests/tolerances.py (~3e-5 here); real defects give > 1e-3."""
    width = max(BASE["hidden_size"], BASE["intermediate_size"])
    return forward_bound(BASE["num_hidden_layers"], width, scale=expected.abs().max().item(),
                         dtype=torch.float32)


@pytest.mark.parametrize("seq_len", [1, 7, 33])
def test_logits_match_transformers(pair, seq_len):
    hf_model, ours = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= _bound(expected)


def test_padded_batch_matches_transformers(pair):
    hf_model, ours = pair
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, input_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= _bound(expected[real])
