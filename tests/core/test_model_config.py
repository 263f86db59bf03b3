"""ModelConfig validation, presets and JSON round trips."""

from __future__ import annotations

import pytest
import torch

from astrai_core.model import PRESETS, ModelConfig, Transformer, get_preset


def test_json_round_trip(tmp_path):
    config = get_preset("small", rope_theta=1e6, head_dim=48)
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        (dict(n_heads=6, n_kv_heads=4), "n_heads"),
        (dict(dim=100, n_heads=8), "dim"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(attention_type="sparse"), "attention_type"),
        (dict(attention_type="mla"), "kv_lora_rank"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(torch_dtype="int8"), "torch_dtype"),
    ],
)
def test_invalid_config_names_the_field(fields, field_name):
    with pytest.raises(ValueError, match=field_name):
        ModelConfig(**{**PRESETS["tiny"], **fields})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="tiny, mini, small, 1b"):
        get_preset("huge")


def meta_parameter_count(config: ModelConfig) -> int:
    """Built on the meta device: shapes only, so even the 1b preset costs no memory."""
    with torch.device("meta"):
        return Transformer(config).num_parameters()


def test_preset_sizes():
    assert meta_parameter_count(get_preset("tiny")) < 1_000_000
    assert 5_000_000 <= meta_parameter_count(get_preset("small")) <= 20_000_000
    big = get_preset("1b")
    assert (big.vocab_size, big.dim, big.n_layers, big.dim_ffn, big.n_heads, big.n_kv_heads) == (
        100000, 1536, 24, 6912, 24, 4)
    assert 1.0e9 <= meta_parameter_count(big) <= 1.2e9


def test_tied_head_shares_the_embedding():
    model = Transformer(get_preset("tiny", tie_weight=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = Transformer(get_preset("tiny", tie_weight=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_padded_rows_give_the_same_logits_as_unpadded_rows():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).eval()
    ids = torch.randint(0, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(ids)
        together = model(padded, input_mask=mask)
    assert torch.isfinite(together).all()
    assert (together[:, 3:] - alone).abs().max().item() <= 1e-5
