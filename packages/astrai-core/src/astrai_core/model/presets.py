"""Named model shapes. `tiny` is for tests, `mini` for the CPU quickstart, `small` a CPU model of
a few million parameters, `1b` the seed's 1B bilingual model (and `1b-mla`, the same shape with
multi-head latent attention).

The mixture-of-experts shapes are DeepSeek-V3's recipe (fine-grained routed experts, one shared
expert, a dense first layer, sigmoid scores with normalised top-k weights, auxiliary-loss-free
balancing): `small-moe` has 15.3M parameters of which a token runs 6.5M, the same as `small`
(its dense twin: one shared + 3 routed experts of 176 = small's 704-wide MLP); `1b-moe` has
0.99B parameters, 0.47B of them active per token (`active_parameters`)."""

from __future__ import annotations

from astrai_core.model.config import ModelConfig

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, dim_ffn=176, n_heads=4, n_kv_heads=2,
                 max_seq_len=512, use_qk_norm=True),
    # The CPU quickstart's model: 1M parameters with its 2k vocabulary. In five minutes of two
    # cores it sees 3-4x the tokens `small` would, which teaches this small world more.
    "mini": dict(vocab_size=2048, dim=128, n_layers=4, dim_ffn=352, n_heads=4, n_kv_heads=2,
                 max_seq_len=512, use_qk_norm=True),
    "small": dict(vocab_size=8192, dim=256, n_layers=6, dim_ffn=704, n_heads=8, n_kv_heads=4,
                  max_seq_len=1024, use_qk_norm=True),
    "1b": dict(vocab_size=100000, dim=1536, n_layers=24, dim_ffn=6912, n_heads=24, n_kv_heads=4,
               max_seq_len=4096, rope_theta=1e6, use_qk_norm=True, use_gated_attention=True),
    "1b-mla": dict(vocab_size=100000, dim=1536, n_layers=24, dim_ffn=6912, n_heads=24, n_kv_heads=24,
                   max_seq_len=4096, rope_theta=1e6, attention_type="mla", kv_lora_rank=256,
                   qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
    "small-moe": dict(vocab_size=8192, dim=256, n_layers=6, dim_ffn=704, n_heads=8, n_kv_heads=4,
                      max_seq_len=1024, use_qk_norm=True, n_experts=16, n_experts_per_token=3,
                      n_shared_experts=1, dim_expert=176, n_dense_layers=1,
                      router_scoring="sigmoid"),
    "1b-moe": dict(vocab_size=100000, dim=1536, n_layers=24, dim_ffn=6912, n_heads=24, n_kv_heads=4,
                   max_seq_len=4096, rope_theta=1e6, use_qk_norm=True, use_gated_attention=True,
                   n_experts=32, n_experts_per_token=4, n_shared_experts=1, dim_expert=176,
                   n_dense_layers=1, router_scoring="sigmoid"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    return ModelConfig(**fields)


__all__ = ["PRESETS", "get_preset"]
