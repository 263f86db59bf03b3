"""Fused serving projections (`astrai_core.model.fusion`): q/k/v (+ the attention gate) and the
SwiGLU gate/up become one product each, with the unfused model's logits."""

from __future__ import annotations

import copy

import pytest
import torch

from astrai_core.model import ModelConfig, Transformer, apply_lora
from astrai_core.model.fusion import fuse_projections
from astrai_core.model.lora import LoRAConfig
from tolerances import reorder_bound

CONFIGS = {
    "gqa-qk-norm": dict(use_qk_norm=True),
    "gated-attention-with-bias": dict(use_gated_attention=True, attention_bias=True),
    "moe-shared-expert": dict(n_experts=4, n_experts_per_token=2, n_shared_experts=1, dim_expert=16),
}


def _model(**extra) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=48,
                         max_seq_len=64, **extra)
    model = Transformer(config).double().eval()
    for p in model.parameters():  # biases and norms away from their init, so each one shows
        p.data.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("extra", CONFIGS.values(), ids=CONFIGS)
def test_fused_model_gives_the_unfused_logits(extra):
    model = _model(**extra)
    fused = copy.deepcopy(model)
    n = fuse_projections(fused)
    assert n >= 2  # both layers' attention at least
    names = {name.rsplit(".", 1)[-1] for name, _ in fused.named_modules()}
    assert "qkv_proj" in names and "q_proj" not in names and "g_proj" not in names
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids), fused(ids)
    # The same dot products, but a GEMM may block them differently once N grows: reordering.
    bound = reorder_bound(48, scale=expected.abs().max().item() * 10)
    torch.testing.assert_close(got, expected, atol=bound, rtol=0)


def test_lora_wrapped_layers_are_left_apart():
    model = _model()
    apply_lora(model, LoRAConfig(rank=2, targets=("q_proj",)))
    fuse_projections(model)
    attn = model.layers[0].self_attn
    assert attn.qkv_proj is None and attn.q_proj is not None  # q is LoRA: nothing fused here
    assert model.layers[0].mlp.gate_up_proj is not None  # the MLP has no adapter: fused
