"""Named model shapes. `tiny` is for tests, `small` for the CPU quickstart, `1b` is the seed's
1B bilingual model (and `1b-mla`, the same shape with multi-head latent attention)."""

from __future__ import annotations

from astrai_core.model.config import ModelConfig

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, dim_ffn=176, n_heads=4, n_kv_heads=2,
                 max_len=512, use_qk_norm=True),
    "small": dict(vocab_size=8192, dim=256, n_layers=6, dim_ffn=704, n_heads=8, n_kv_heads=4,
                  max_len=1024, use_qk_norm=True),
    "1b": dict(vocab_size=100000, dim=1536, n_layers=24, dim_ffn=6912, n_heads=24, n_kv_heads=4,
               max_len=4096, rope_theta=1e6, use_qk_norm=True, use_gated_attention=True),
    "1b-mla": dict(vocab_size=100000, dim=1536, n_layers=24, dim_ffn=6912, n_heads=24, n_kv_heads=24,
                   max_len=4096, rope_theta=1e6, attention_type="mla", kv_lora_rank=256,
                   qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    return ModelConfig(**fields)


def list_presets() -> list[str]:
    return list(PRESETS)


__all__ = ["PRESETS", "get_preset", "list_presets"]
