"""`ModelConfig`: the seed's fields plus what real checkpoints need; JSON load/save."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

AttentionType = Literal["gqa", "mla"]


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
    max_len: int = 2048  # longest sequence (context window) the model serves
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
    init_std: float = 0.02
    torch_dtype: str = "float32"  # dtype the weights are stored in
    model_type: str = "astrai"
    extra: dict[str, Any] = field(default_factory=dict)  # fields we keep but do not interpret

    def __post_init__(self) -> None:
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def validate(self) -> None:
        positive = ["vocab_size", "dim", "n_layers", "dim_ffn", "max_len", "n_heads", "n_kv_heads"]
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

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        kwargs.setdefault("extra", {}).update(extra)
        return cls(**kwargs)

    def save(self, config_path: str | os.PathLike) -> None:
        Path(config_path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, config_path: str | os.PathLike) -> ModelConfig:
        path = Path(config_path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no model config at {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def num_parameters(self) -> int:
        """Parameter count computed from the shape, without building the model."""
        import torch

        from astrai_core.model.transformer import Transformer  # local: avoid a cycle

        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(self).parameters())
