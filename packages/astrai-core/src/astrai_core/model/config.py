"""`ModelConfig`: the seed's fields plus what real checkpoints need; JSON load/save."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from astrai_core.atomic import atomic_file
from astrai_core.deprecation import accept_renamed, rename_keys

AttentionType = Literal["gqa", "mla"]
RouterScoring = Literal["softmax", "sigmoid"]
ROUTER_SCORINGS = ("softmax", "sigmoid")
# The mixture-of-experts fields with their dense values: a dense config leaves them out of
# config.json, so the files of dense models are exactly what they were before MoE existed.
MOE_DEFAULTS: dict[str, Any] = {"n_experts": 0, "n_experts_per_token": 0, "n_shared_experts": 0,
                                "dim_expert": 0, "n_dense_layers": 0, "router_scoring": "softmax",
                                "norm_topk_prob": True}


# Old field name -> new name; config.json files written by earlier releases load unchanged.
RENAMED_FIELDS = {"max_len": "max_seq_len"}


@accept_renamed(RENAMED_FIELDS)
@dataclass
class ModelConfig:
    """Shape and options of a decoder-only Transformer.

    Field names follow the seed design; `from_hf`/`to_hf` in `hf.py` map them to the names that
    Hugging Face `config.json` files use.
    """

    vocab_size: int = 32000
    dim: int = 512  # hidden size
    n_layers: int = 8
    norm_eps: float = 1e-6
    dim_ffn: int = 1408  # SwiGLU inner size
    tie_weight: bool = True  # lm_head shares the embedding matrix
    max_seq_len: int = 2048  # longest sequence (context window) the model serves
    rope_theta: float = 10000.0
    n_heads: int = 8
    n_kv_heads: int = 8
    use_qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    use_gated_attention: bool = False  # sigmoid output gate on the attention output
    head_dim: int | None = None  # None means dim // n_heads
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias sets both)
    mlp_bias: bool = False
    attention_type: AttentionType = "gqa"
    # Multi-head latent attention (DeepSeek-V2): the cache holds the compressed latent.
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Mixture of experts (DeepSeek-style, model/moe.py): each token runs the top-k of n_experts
    # routed SwiGLU experts plus the shared ones; the first n_dense_layers keep the dense MLP.
    # n_experts 0 is a dense model (the other MoE fields then stay unset).
    n_experts: int = 0  # routed experts per MoE layer
    n_experts_per_token: int = 0  # k: routed experts each token runs
    n_shared_experts: int = 0  # experts every token runs (one SwiGLU n_shared * dim_expert wide)
    dim_expert: int = 0  # SwiGLU inner size of one expert
    n_dense_layers: int = 0  # leading layers with the dense MLP (DeepSeek's first_k_dense_replace)
    router_scoring: RouterScoring = "softmax"  # expert scores: softmax over experts, or sigmoid
    norm_topk_prob: bool = True  # the k chosen scores are divided by their sum
    init_std: float = 0.02
    torch_dtype: str = "float32"  # dtype the weights are stored in
    model_type: str = "astrai"
    extra: dict[str, Any] = field(default_factory=dict)  # fields we keep but do not interpret

    def __post_init__(self) -> None:
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether block `layer_id` has the mixture-of-experts feed-forward."""
        return self.is_moe and layer_id >= self.n_dense_layers

    def validate(self) -> None:
        positive = ["vocab_size", "dim", "n_layers", "dim_ffn", "max_seq_len", "n_heads", "n_kv_heads"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.attention_type not in ("gqa", "mla"):
            raise ValueError(
                f"ModelConfig.attention_type must be 'gqa' or 'mla', got {self.attention_type!r}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by "
                f"n_kv_heads ({self.n_kv_heads}) for grouped-query attention"
            )
        if self.head_dim is None and self.dim % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), "
                "or set head_dim explicitly"
            )
        if self.attention_type == "gqa" and self.resolved_head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.resolved_head_dim}")
        if self.attention_type == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"ModelConfig.{name} must be > 0 when attention_type is 'mla'")
            if self.qk_rope_head_dim % 2 != 0:
                raise ValueError("ModelConfig.qk_rope_head_dim must be even for RoPE")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"ModelConfig.torch_dtype must be float32, bfloat16 or float16, got {self.torch_dtype!r}"
            )
        self._validate_moe()

    def _validate_moe(self) -> None:
        counts = ("n_experts", "n_experts_per_token", "n_shared_experts", "dim_expert",
                  "n_dense_layers")
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
        if self.router_scoring not in ROUTER_SCORINGS:
            raise ValueError(f"ModelConfig.router_scoring must be 'softmax' or 'sigmoid', got "
                             f"{self.router_scoring!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"ModelConfig.norm_topk_prob must be true or false, got "
                             f"{self.norm_topk_prob!r}")
        if not self.is_moe:
            for name in counts[1:]:
                if getattr(self, name):
                    raise ValueError(f"ModelConfig.{name} is set but n_experts is 0 (a dense "
                                     f"model); set n_experts to the routed experts per layer, "
                                     f"or leave {name} unset")
            return
        if not 1 <= self.n_experts_per_token <= self.n_experts:
            raise ValueError(f"ModelConfig.n_experts_per_token must be between 1 and n_experts "
                             f"({self.n_experts}), got {self.n_experts_per_token}")
        if self.dim_expert <= 0:
            raise ValueError("ModelConfig.dim_expert (the SwiGLU inner size of one expert) must "
                             "be a positive integer when n_experts > 0")
        if self.n_dense_layers >= self.n_layers:
            raise ValueError(f"ModelConfig.n_dense_layers ({self.n_dense_layers}) must be below "
                             f"n_layers ({self.n_layers}), so at least one layer has experts; "
                             "for a dense model set n_experts to 0")
        if self.mlp_bias:
            raise ValueError("ModelConfig.mlp_bias is not supported with experts (n_experts > 0): "
                             "the experts have no bias; set mlp_bias to false")

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.is_moe:
            for name in MOE_DEFAULTS:
                data.pop(name)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a JSON object of fields, got "
                             f"{type(data).__name__}")
        data = rename_keys(data, RENAMED_FIELDS, "ModelConfig", warn=False)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if not isinstance(kwargs.get("extra", {}), dict):
            raise ValueError(f"ModelConfig.extra must be an object of fields, got "
                             f"{type(kwargs['extra']).__name__}")
        extra = {k: v for k, v in data.items() if k not in known}
        kwargs["extra"] = {**kwargs.get("extra", {}), **extra}
        return cls(**kwargs)

    def save(self, config_path: str | os.PathLike) -> None:
        with atomic_file(config_path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, config_path: str | os.PathLike) -> ModelConfig:
        return cls.from_dict(read_config_file(Path(config_path)))


def read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object in a config.json, or an error that says what the file holds instead."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no model config at {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file, so not a model config; copy the model "
                         "folder again (or write a new one with `astrai model init`)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix the file or copy the model "
                         "folder again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {_json_type(data)}, but a model config is a JSON "
                         "object of fields ({\"dim\": 512, ...}); fix the file or copy the "
                         "model folder again")
    return data


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
