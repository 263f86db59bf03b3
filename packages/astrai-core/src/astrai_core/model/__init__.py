"""The AstrAI model: config, layers, the Transformer and AutoModel."""

from astrai_core.model.adapter import LoRAAdapter, load_adapter, save_adapter
from astrai_core.model.attention import GQA
from astrai_core.model.automodel import AutoModel
from astrai_core.model.block import DecoderBlock
from astrai_core.model.cache import ContiguousCache, KVSpec, PagedCache
from astrai_core.model.config import ModelConfig
from astrai_core.model.generate import generate
from astrai_core.model.linear import Embedding, Linear
from astrai_core.model.lora import LoRAConfig, LoRALinear, adapters_disabled, apply_lora, merge_lora
from astrai_core.model.masks import causal_mask, padded_causal_mask, positions_from_mask
from astrai_core.model.mla import MLA
from astrai_core.model.mlp import MLP
from astrai_core.model.moe import Experts, MoE, Router, active_parameters, moe_layers
from astrai_core.model.norm import RMSNorm
from astrai_core.model.presets import PRESETS, get_preset
from astrai_core.model.rope import RotaryEmbedding
from astrai_core.model.transformer import Transformer

__all__ = [
    "GQA",
    "MLA",
    "MLP",
    "PRESETS",
    "AutoModel",
    "ContiguousCache",
    "DecoderBlock",
    "Embedding",
    "Experts",
    "KVSpec",
    "Linear",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRALinear",
    "MoE",
    "ModelConfig",
    "PagedCache",
    "RMSNorm",
    "RotaryEmbedding",
    "Router",
    "Transformer",
    "active_parameters",
    "adapters_disabled",
    "apply_lora",
    "causal_mask",
    "generate",
    "get_preset",
    "load_adapter",
    "merge_lora",
    "moe_layers",
    "padded_causal_mask",
    "positions_from_mask",
    "save_adapter",
]
