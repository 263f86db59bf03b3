"""LoRA layers on the AstrAI model: the adapter's arithmetic against a hand computation, what is
frozen, switching adapters off, merging, target selection, and per-row adapters for serving."""

from __future__ import annotations

import math

import pytest
import torch

from astrai_core.model import ModelConfig, Transformer
from astrai_core.model.lora import (
    BLOCK_PROJECTIONS,
    LoRAConfig,
    LoRALinear,
    adapter_rows,
    adapters_disabled,
    apply_lora,
    install_bank,
    is_lora_parameter,
    load_lora_state_dict,
    lora_config_of,
    lora_layers,
    lora_state_dict,
    merge_lora,
)
from tolerances import forward_bound, reorder_bound

FIELDS = dict(vocab_size=96, dim=32, n_layers=2, dim_ffn=64, n_heads=4, n_kv_heads=2, max_seq_len=64)


def model64(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**FIELDS, **overrides})).double().eval()


def randomize_adapters(model, seed: int = 1, std: float = 0.2) -> None:
    """B is zero after init; give it values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g,
                                                  dtype=layer.lora_B.weight.dtype) * std)


def ids(seed: int = 0, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, FIELDS["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def logit_bound(expected: torch.Tensor) -> float:
    return forward_bound(FIELDS["n_layers"], FIELDS["dim_ffn"], scale=expected.abs().max().item())


def test_a_new_adapter_leaves_the_model_exactly_as_it_was():
    model = model64()
    x = ids()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, LoRAConfig(rank=4))
        after = model(x)
    assert torch.equal(before, after)  # B = 0: the delta is an exact zero


def test_lora_linear_is_w_x_plus_b_plus_scaled_b_a_x():
    torch.manual_seed(0)
    base = Transformer(ModelConfig(**FIELDS, attention_bias=True, attention_out_bias=True)).double()
    layer = base.layers[0].self_attn.q_proj
    lora = LoRALinear(layer, LoRAConfig(rank=3, alpha=12.0))
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(5, 32, dtype=torch.float64)
    W, b = layer.weight.detach(), layer.bias.detach()
    A, B = lora.lora_A.weight.detach(), lora.lora_B.weight.detach()
    by_hand = x @ W.T + b + (12.0 / 3) * (x @ A.T) @ B.T
    got = lora(x)
    # Each output sums 32 (base) and 32 + 3 (adapter) products of numbers below ~3 in size.
    assert (got - by_hand).abs().max() <= reorder_bound(67, scale=float(by_hand.abs().max()))
    assert lora.weight is layer.weight and lora.bias is layer.bias  # the same Parameters


def test_a_is_drawn_like_peft_and_b_starts_at_zero():
    layer = LoRALinear(model64().layers[0].mlp.down_proj, LoRAConfig(rank=8))
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on (r, in=64): U(-1/sqrt(in), 1/sqrt(in))
    A = layer.lora_A.weight
    assert A.shape == (8, 64) and A.abs().max() <= bound and A.std() > bound / 3
    assert layer.lora_B.weight.shape == (32, 8) and not layer.lora_B.weight.any()


def test_only_the_adapters_train_and_the_base_names_stay():
    model = model64()
    base_names = set(model.state_dict())
    names = apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    assert names == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert all(is_lora_parameter(n) for n in trainable)
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 KV heads of 8): r * (in + out) each
    assert sum(p.numel() for p in trainable.values()) == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert set(model.state_dict()) == base_names | set(trainable)


def test_all_linear_targets_every_block_projection_and_unknown_names_are_refused():
    model = model64()
    names = apply_lora(model, LoRAConfig(rank=2))
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == sorted(BLOCK_PROJECTIONS)
    assert len(names) == 2 * 7 and "lm_head" not in " ".join(names)
    with pytest.raises(ValueError, match="'qproj' matches no layer of this model; its block "
                                         "layers are down_proj, gate_proj, k_proj"):
        apply_lora(model64(), LoRAConfig(targets=("qproj",)))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())
    mla = model64(attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                  v_head_dim=8, n_kv_heads=4)
    with pytest.raises(ValueError, match="kv_b_proj' is not supported: MLA's cached decode"):
        apply_lora(mla, LoRAConfig(targets=("kv_b_proj",)))
    assert "kv_b_proj" not in " ".join(apply_lora(mla, LoRAConfig()))  # all-linear skips it


@pytest.mark.parametrize(("fields", "message"), [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(targets=()), "targets must name layers"),
])
def test_lora_config_refuses_impossible_values(fields, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**fields)


def test_scaling_is_alpha_over_rank_or_over_sqrt_rank_with_rslora():
    assert LoRAConfig(rank=8).scaling == 2.0  # alpha defaults to 2 * rank
    assert LoRAConfig(rank=8, alpha=4).scaling == 0.5
    assert LoRAConfig(rank=16, alpha=8, use_rslora=True).scaling == 2.0


def test_disabled_adapters_give_the_base_logits_and_switch_back_on():
    model = model64()
    x = ids(1)
    with torch.no_grad():
        base = model(x)
        apply_lora(model, LoRAConfig(rank=4))
        randomize_adapters(model)
        adapted = model(x)
        with adapters_disabled(model):
            off = model(x)
        again = model(x)
    assert torch.equal(off, base)
    assert torch.equal(again, adapted)
    assert (adapted - base).abs().max() > 1000 * logit_bound(base)  # the adapter matters


def test_merging_gives_the_adapted_logits_with_the_base_names():
    model = model64()
    base_names = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, alpha=16))
    randomize_adapters(model)
    x = ids(2)
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        merged = model(x)
    assert set(model.state_dict()) == base_names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (merged - adapted).abs().max() <= logit_bound(adapted)


def test_adapter_weights_round_trip_and_a_mismatch_says_what_to_use():
    a, b = model64(0), model64(0)
    config = LoRAConfig(rank=4, targets=("q_proj",))
    apply_lora(a, config)
    apply_lora(b, config)
    randomize_adapters(a)
    load_lora_state_dict(b, lora_state_dict(a))
    x = ids(3)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert lora_config_of(b) == LoRAConfig(rank=4, targets=("q_proj",))
    other = model64(0)
    apply_lora(other, LoRAConfig(rank=2, targets=("q_proj",)))
    with pytest.raises(ValueError, match="has shape .* use the same --lora-rank"):
        load_lora_state_dict(other, lora_state_dict(a))
    wider = model64(0)
    apply_lora(wider, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    with pytest.raises(ValueError, match="missing layers.0.self_attn.v_proj.lora_A.weight"):
        load_lora_state_dict(wider, lora_state_dict(a))


def test_per_row_adapters_in_one_batch_equal_each_adapter_merged_alone():
    """Serving's path: one base, a bank of two adapters of different ranks and targets, and a
    batch whose rows use adapter 0, adapter 1 and none."""
    adapters, merged = [], []
    for seed, cfg in ((1, LoRAConfig(rank=4, targets=("q_proj", "v_proj"))),
                      (2, LoRAConfig(rank=2, alpha=8, targets=("o_proj", "down_proj", "q_proj")))):
        tuned = model64(0)
        apply_lora(tuned, cfg)
        randomize_adapters(tuned, seed)
        adapters.append((cfg, lora_state_dict(tuned)))
        merged.append(merge_lora(tuned))
    served = model64(0)
    install_bank(served, adapters)
    x = ids(4, shape=(3, 9))
    rows = torch.tensor([0, 1, -1])
    with torch.no_grad():
        with adapter_rows(served, rows):
            out = served(x)
        expected = [merged[0](x[:1]), merged[1](x[1:2]), model64(0)(x[2:])]
        plain = served(x)  # outside the block no adapter applies
    for i, want in enumerate(expected):
        assert (out[i] - want[0]).abs().max() <= logit_bound(want), i
    assert torch.equal(plain[2], out[2])
    assert (plain[0] - out[0]).abs().max() > 1000 * logit_bound(out)
