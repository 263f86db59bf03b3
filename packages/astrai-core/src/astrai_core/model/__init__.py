"""The AstrAI model: config, layers, the Transformer and AutoModel."""

from astrai_core.model.attention import GQA
from astrai_core.model.automodel import AutoModel
from astrai_core.model.block import DecoderBlock
from astrai_core.model.cache import ContiguousCache, KVSpec, PagedCache
from astrai_core.model.config import ModelConfig
from astrai_core.model.generate import generate
from astrai_core.model.linear import Embedding, Linear
from astrai_core.model.mla import MLA
from astrai_core.model.mlp import MLP
from astrai_core.model.norm import RMSNorm
from astrai_core.model.presets import PRESETS, get_preset, list_presets
from astrai_core.model.rope import RotaryEmbedding
from astrai_core.model.transformer import Transformer

__all__ = [
    "GQA", "MLA", "MLP", "PRESETS", "AutoModel", "ContiguousCache", "DecoderBlock", "Embedding",
    "KVSpec", "Linear", "ModelConfig", "PagedCache", "RMSNorm", "RotaryEmbedding", "Transformer",
    "generate", "get_preset", "list_presets",
]
