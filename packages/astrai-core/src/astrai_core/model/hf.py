"""Hugging Face `llama`, `qwen2` and `qwen3` folders, loaded as they are.

The mapping is two short tables: config fields, and one weight-name prefix (`model.`), because
our parameter names already follow the ecosystem's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from astrai_core.model.config import ModelConfig

HF_PREFIX = "model."


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(
            f"config.json uses rope_type '{rope_type}', which AstrAI does not support yet; "
            "only the default RoPE is implemented"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _dtype_name(hf: dict[str, Any]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _common(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act '{hf['hidden_act']}'; AstrAI implements silu (SwiGLU)")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json enables use_sliding_window, which AstrAI does not support")
    n_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        dim_ffn=hf["intermediate_size"],
        tie_weight=hf.get("tie_word_embeddings", False),
        max_len=hf.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(hf),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or None,
        torch_dtype=_dtype_name(hf),
        init_std=hf.get("initializer_range", 0.02),
    )


def _llama(hf: dict[str, Any]) -> dict[str, Any]:
    bias = hf.get("attention_bias", False)
    return dict(_common(hf), attention_bias=bias, attention_out_bias=bias,
                mlp_bias=hf.get("mlp_bias", False))


def _qwen2(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(_common(hf), attention_bias=True, attention_out_bias=False)


def _qwen3(hf: dict[str, Any]) -> dict[str, Any]:
    bias = hf.get("attention_bias", False)
    return dict(_common(hf), attention_bias=bias, attention_out_bias=bias, use_qk_norm=True)


HF_CONFIG_ADAPTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
}


def is_hf_model_type(model_type: str) -> bool:
    return model_type in HF_CONFIG_ADAPTERS


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    fields = HF_CONFIG_ADAPTERS[hf["model_type"]](hf)
    return ModelConfig(**fields, extra={"source_model_type": hf["model_type"]})


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):  # older exports carry this buffer; we recompute it
            continue
        out[name.removeprefix(HF_PREFIX)] = tensor
    return out


def config_to_hf_llama(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face `llama` config.json for a GQA model without qk-norm or gating."""
    if config.attention_type != "gqa" or config.use_qk_norm or config.use_gated_attention:
        raise ValueError("only plain GQA models (no qk-norm, no gate) map to Hugging Face llama")
    if config.attention_bias != config.attention_out_bias:
        raise ValueError("llama has one attention_bias for q/k/v/o; this config differs")
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.dim_ffn,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "max_position_embeddings": config.max_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_weight,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "hidden_act": "silu",
    }


def state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k if k.startswith("lm_head") else HF_PREFIX + k): v for k, v in state.items()}
