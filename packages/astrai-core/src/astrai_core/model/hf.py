"""Hugging Face `llama`, `qwen2`, `qwen3` and the mixture-of-experts `qwen3_moe` and `mixtral`
folders: loaded as they are, and written back.

Import and export share one mapping, so a round trip is the test of both: a table of config
fields (`HF_CONFIG_FIELDS`, plus `HF_MOE_CONFIG_FIELDS` per MoE family), one weight-name prefix
(`model.`, because our parameter names already follow the ecosystem's), per family the
attention options it fixes or allows, and for MoE layers the one layout difference: the files
hold one tensor per expert (`mlp.experts.3.gate_proj.weight`; Mixtral's
`block_sparse_moe.experts.3.w1.weight`) where ours are stacked (`mlp.experts.gate_up_proj`
(E, 2I, D) and `mlp.experts.down_proj` (E, D, I), transformers' own in-memory layout); see
`HF_EXPERT_LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from astrai_core.model.config import ModelConfig
from astrai_core.model.weights import NON_PARAMETER_SUFFIXES

HF_PREFIX = "model."

# Our ModelConfig field -> the config.json key every llama/qwen2/qwen3 config uses for it.
HF_CONFIG_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "dim_ffn": "intermediate_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "tie_weight": "tie_word_embeddings",
    "init_std": "initializer_range",
    "torch_dtype": "torch_dtype",
}
# Defaults of the optional keys, as transformers' own config classes have them.
HF_DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2048,
    "rope_theta": 10000.0, "initializer_range": 0.02, "head_dim": None,
    "num_key_value_heads": None, "torch_dtype": None,
}
# Where a family's config class has other defaults (they change the numbers, so they matter).
HF_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"max_position_embeddings": 32768},
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072},
}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                    "mixtral": "MixtralForCausalLM"}
# Our MoE field -> the config.json key of each MoE family. Mixtral's experts are
# intermediate_size wide and it has no dense layers; transformers 5 writes qwen3_moe's
# num_experts as num_local_experts (both are read).
HF_MOE_CONFIG_FIELDS: dict[str, dict[str, str]] = {
    "qwen3_moe": {"n_experts": "num_experts", "n_experts_per_token": "num_experts_per_tok",
                  "dim_expert": "moe_intermediate_size", "norm_topk_prob": "norm_topk_prob"},
    "mixtral": {"n_experts": "num_local_experts", "n_experts_per_token": "num_experts_per_tok",
                "dim_expert": "intermediate_size"},
}
# Defaults of transformers' Qwen3MoeConfig / MixtralConfig for the MoE keys.
HF_MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                  "norm_topk_prob": False},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
}


@dataclass(frozen=True)
class ExpertLayout:
    """How a family's files name the tensors of a MoE layer (after `model.`)."""

    block: str  # the feed-forward module (ours: `mlp`)
    gate: str  # the per-expert projections
    up: str
    down: str

    def expert(self, layer: int, expert: int, projection: str) -> str:
        return f"layers.{layer}.{self.block}.experts.{expert}.{projection}.weight"


HF_EXPERT_LAYOUTS = {"qwen3_moe": ExpertLayout("mlp", "gate_proj", "up_proj", "down_proj"),
                     "mixtral": ExpertLayout("block_sparse_moe", "w1", "w3", "w2")}
EXPERT_BIAS = "e_score_correction_bias"  # ours only: the balancing bias (0 in every HF family)


def _rope_theta(hf: dict[str, Any], default: float) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(
            f"config.json uses rope_type '{rope_type}', which AstrAI does not support yet; "
            "only the default RoPE is implemented"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def _dtype_name(hf: dict[str, Any]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _common(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act '{hf['hidden_act']}'; AstrAI implements silu (SwiGLU)")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json enables use_sliding_window, which AstrAI does not support")
    defaults = {**HF_DEFAULTS, **HF_FAMILY_DEFAULTS.get(hf["model_type"], {})}
    fields = {ours: hf[key] if key not in defaults else hf.get(key, defaults[key])
              for ours, key in HF_CONFIG_FIELDS.items()}
    fields["n_kv_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    fields["head_dim"] = hf.get("head_dim") or None
    fields["rope_theta"] = _rope_theta(hf, defaults["rope_theta"])
    fields["torch_dtype"] = _dtype_name(hf)
    return fields


def _llama(hf: dict[str, Any]) -> dict[str, Any]:
    bias = hf.get("attention_bias", False)
    return dict(_common(hf), attention_bias=bias, attention_out_bias=bias,
                mlp_bias=hf.get("mlp_bias", False))


def _qwen2(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(_common(hf), attention_bias=True, attention_out_bias=False)


def _qwen3(hf: dict[str, Any]) -> dict[str, Any]:
    bias = hf.get("attention_bias", False)
    return dict(_common(hf), attention_bias=bias, attention_out_bias=bias, use_qk_norm=True)


def _moe_fields(hf: dict[str, Any], family: str) -> dict[str, Any]:
    defaults = HF_MOE_DEFAULTS[family]
    return {ours: hf.get(key, defaults.get(key)) if key in defaults else hf[key]
            for ours, key in HF_MOE_CONFIG_FIELDS[family].items()}


def _qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    fields = _qwen3(hf)
    if "num_experts" not in hf and "num_local_experts" in hf:
        hf = {**hf, "num_experts": hf["num_local_experts"]}
    moe = _moe_fields(hf, "qwen3_moe")
    dense = _dense_layers(hf, moe["n_experts"])
    if len(dense) == fields["n_layers"]:  # no layer has experts: a qwen3 model
        return fields
    return dict(fields, **moe, n_dense_layers=len(dense))


def _dense_layers(hf: dict[str, Any], n_experts: int) -> list[int]:
    """The layers a qwen3_moe config keeps dense; AstrAI's are always the leading ones."""
    step = hf.get("decoder_sparse_step") or 1
    only_mlp = set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(hf["num_hidden_layers"])
             if i in only_mlp or n_experts == 0 or (i + 1) % step != 0]
    if dense != list(range(len(dense))):
        raise ValueError(f"config.json makes layers {dense} dense (mlp_only_layers, "
                         f"decoder_sparse_step {step}); AstrAI keeps only leading layers dense "
                         "(mlp_only_layers [0, ..., k-1] with decoder_sparse_step 1)")
    return dense


def _mixtral(hf: dict[str, Any]) -> dict[str, Any]:
    fields = _common(hf)
    window = hf.get("sliding_window")
    if window is not None and window < fields["max_seq_len"]:
        raise ValueError(f"config.json sets sliding_window {window}, below its context of "
                         f"{fields['max_seq_len']} tokens, and AstrAI has no sliding-window "
                         "attention; set max_position_embeddings to the window (or less) to "
                         "load it")
    return dict(fields, **_moe_fields(hf, "mixtral"), norm_topk_prob=True)


HF_CONFIG_ADAPTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
}


def is_hf_model_type(model_type: str) -> bool:
    return model_type in HF_CONFIG_ADAPTERS


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    try:
        fields = HF_CONFIG_ADAPTERS[hf["model_type"]](hf)
    except KeyError as exc:
        raise ValueError(f"config.json ({hf['model_type']}) lacks {exc}, which every "
                         f"{hf['model_type']} config has; copy the model folder again") from None
    return ModelConfig(**fields, extra={"source_model_type": hf["model_type"]})


def state_dict_from_hf(hf_state: dict[str, torch.Tensor],
                       config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's tensors under our names. `config` (from `config_from_hf`) says
    which layers have experts; their per-expert tensors are stacked."""
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith(NON_PARAMETER_SUFFIXES):  # older exports carry this buffer; we recompute it
            continue
        out[name.removeprefix(HF_PREFIX)] = tensor
    if config is not None and config.is_moe:
        layout = HF_EXPERT_LAYOUTS[config.extra.get("source_model_type", "qwen3_moe")]
        for layer in range(config.n_layers):
            if config.is_moe_layer(layer):
                _stack_experts(out, layer, config.n_experts, layout)
    return out


def _stack_experts(state: dict[str, torch.Tensor], layer: int, n_experts: int,
                   layout: ExpertLayout) -> None:
    ours, theirs = f"layers.{layer}.mlp", f"layers.{layer}.{layout.block}"
    if f"{theirs}.gate.weight" in state:
        state[f"{ours}.gate.weight"] = state.pop(f"{theirs}.gate.weight")
    stacked = [f"{theirs}.experts.{name}" for name in ("gate_up_proj", "down_proj")]
    if all(name in state for name in stacked):  # already stacked (transformers' own layout)
        for name in stacked:
            state[name.replace(theirs, ours, 1)] = state.pop(name)
    else:
        def take(expert: int, projection: str) -> torch.Tensor:
            name = layout.expert(layer, expert, projection)
            if name not in state:
                raise ValueError(f"the weights lack '{HF_PREFIX}{name}', which config.json "
                                 f"implies ({n_experts} experts in layer {layer}); copy the "
                                 "model folder again")
            return state.pop(name)

        gate_up = [torch.cat([take(e, layout.gate), take(e, layout.up)]) for e in range(n_experts)]
        state[f"{ours}.experts.gate_up_proj"] = torch.stack(gate_up)
        state[f"{ours}.experts.down_proj"] = torch.stack([take(e, layout.down)
                                                          for e in range(n_experts)])
    router = state.get(f"{ours}.gate.weight")
    dtype = router.dtype if router is not None else torch.float32
    state.setdefault(f"{ours}.gate.{EXPERT_BIAS}", torch.zeros(n_experts, dtype=dtype))


def state_dict_to_hf(state: dict[str, torch.Tensor],
                     family: str | None = None) -> dict[str, torch.Tensor]:
    """Our tensors under a Hugging Face family's names; MoE layers get one tensor per expert,
    in mixtral's layout for family mixtral and qwen3_moe's otherwise. The balancing biases,
    which no family has, are left out: check them with `nonzero_expert_biases` first."""
    layout = HF_EXPERT_LAYOUTS["mixtral" if family == "mixtral" else "qwen3_moe"]
    out = {}
    for name, tensor in state.items():
        if name.endswith(EXPERT_BIAS):
            continue
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            out.update(_split_experts(name, tensor, layout))
            continue
        if name.endswith(".mlp.gate.weight"):
            name = name.replace(".mlp.", f".{layout.block}.")
        out[name if name.startswith("lm_head") else HF_PREFIX + name] = tensor
    return out


def _split_experts(name: str, tensor: torch.Tensor, layout: ExpertLayout) -> dict[str, torch.Tensor]:
    layer = int(name.split(".")[1])
    out = {}
    for e, weight in enumerate(tensor.unbind(0)):
        if name.endswith("gate_up_proj"):
            gate, up = weight.chunk(2)
            out[HF_PREFIX + layout.expert(layer, e, layout.gate)] = gate.contiguous()
            out[HF_PREFIX + layout.expert(layer, e, layout.up)] = up.contiguous()
        else:
            out[HF_PREFIX + layout.expert(layer, e, layout.down)] = weight.contiguous()
    return out


def nonzero_expert_biases(state: dict[str, torch.Tensor]) -> list[str]:
    """The MoE layers whose balancing bias is not 0 (trained with auxiliary-loss-free
    balancing): no Hugging Face family routes with such a bias."""
    return [name.rsplit(".mlp.", 1)[0] for name, t in state.items()
            if name.endswith(EXPERT_BIAS) and bool(t.any())]


# -- export -------------------------------------------------------------------------------------
def hf_family(config: ModelConfig) -> str:
    """The Hugging Face family that holds `config` exactly: qwen3 (qk-norm), qwen2 (bias on q/k/v
    only) or llama; with experts qwen3_moe (qk-norm) or mixtral. Raises ValueError naming every
    feature that none of them has."""
    unsupported = unsupported_hf_features(config)
    if unsupported:
        raise ValueError("this model has no Hugging Face equivalent: " + "; ".join(unsupported)
                         + ". transformers' llama, qwen2, qwen3, qwen3_moe and mixtral cannot "
                         "hold it, so it is not exported (serve it with `astrai serve` instead)")
    if config.is_moe:
        return "qwen3_moe" if config.use_qk_norm else "mixtral"
    if config.use_qk_norm:
        return "qwen3"
    if config.attention_bias and not config.attention_out_bias:
        return "qwen2"
    return "llama"


def unsupported_hf_features(config: ModelConfig) -> list[str]:
    found = []
    if config.attention_type != "gqa":
        found.append(f"attention_type '{config.attention_type}' (multi-head latent attention)")
    if config.use_gated_attention:
        found.append("use_gated_attention (a sigmoid output gate on attention)")
    if config.attention_out_bias and not config.attention_bias:
        found.append("attention_out_bias without attention_bias (a bias on o_proj alone)")
    if config.use_qk_norm and config.attention_bias != config.attention_out_bias:
        found.append("qk-norm with a bias on q/k/v but not on o_proj")
    if config.use_qk_norm and config.mlp_bias:
        found.append("qk-norm with mlp_bias (qwen3 has no MLP bias)")
    if config.attention_bias and not config.attention_out_bias and config.mlp_bias:
        found.append("q/k/v bias with mlp_bias (qwen2 has no MLP bias)")
    if config.is_moe:
        found.extend(_unsupported_moe_features(config))
    return found


def _unsupported_moe_features(config: ModelConfig) -> list[str]:
    """What qwen3_moe (experts, qk-norm) and mixtral (experts, no qk-norm) cannot hold."""
    found = []
    if config.n_shared_experts:
        found.append(f"n_shared_experts {config.n_shared_experts} (shared experts: qwen3_moe "
                     "and mixtral route every expert)")
    if config.router_scoring != "softmax":
        found.append(f"router_scoring '{config.router_scoring}' (qwen3_moe and mixtral score "
                     "experts with a softmax)")
    if not config.use_qk_norm:  # mixtral
        if config.attention_bias:
            found.append("experts with attention biases but no qk-norm (mixtral has no biases)")
        if config.n_dense_layers:
            found.append("dense leading layers without qk-norm (every mixtral layer has experts)")
        if not config.norm_topk_prob:
            found.append("norm_topk_prob false without qk-norm (mixtral always renormalises)")
    return found


def config_to_hf(config: ModelConfig, family: str | None = None) -> dict[str, Any]:
    """The config.json of `config` as a Hugging Face `family` folder (default: `hf_family`)."""
    family = family or hf_family(config)
    out: dict[str, Any] = {"model_type": family, "architectures": [HF_ARCHITECTURES[family]]}
    out.update({key: getattr(config, ours) for ours, key in HF_CONFIG_FIELDS.items()})
    out["head_dim"] = config.resolved_head_dim
    out["hidden_act"] = "silu"
    out.update({key: getattr(config, ours)
                for ours, key in HF_MOE_CONFIG_FIELDS.get(family, {}).items()})
    if family == "llama":
        out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    elif family in ("qwen3", "qwen3_moe"):
        out.update(attention_bias=config.attention_bias, use_sliding_window=False)
    elif family == "mixtral":
        out["sliding_window"] = None
    else:
        out["use_sliding_window"] = False
    if family == "qwen3_moe":
        out.update(mlp_only_layers=list(range(config.n_dense_layers)), decoder_sparse_step=1)
    return out


def config_to_hf_llama(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face `llama` config.json for a GQA model without qk-norm or gating."""
    if config.attention_type != "gqa" or config.use_qk_norm or config.use_gated_attention:
        raise ValueError("only plain GQA models (no qk-norm, no gate) map to Hugging Face llama")
    if config.attention_bias != config.attention_out_bias:
        raise ValueError("llama has one attention_bias for q/k/v/o; this config differs")
    return config_to_hf(config, "llama")
