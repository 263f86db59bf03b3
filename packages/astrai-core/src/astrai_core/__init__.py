"""astrai-core: the model, AutoModel, tokenizer and chat templates, the factory registry,
checkpoints and the `astrai` CLI root."""

from importlib.metadata import version as _version

from astrai_core.atomic import atomic_dir, atomic_file, remove_stale_temps
from astrai_core.checkpoint import Checkpoint
from astrai_core.factory import BaseFactory, Registry
from astrai_core.model import (
    GQA,
    MLA,
    MLP,
    AutoModel,
    ContiguousCache,
    DecoderBlock,
    Embedding,
    KVSpec,
    Linear,
    LoRAAdapter,
    LoRAConfig,
    ModelConfig,
    MoE,
    PagedCache,
    RMSNorm,
    RotaryEmbedding,
    Transformer,
    generate,
    get_preset,
    moe_layers,
)
from astrai_core.tokenizer import AutoTokenizer, ChatTemplate, IncrementalDecoder

__version__ = _version("astrai-core")

__all__ = [
    "GQA",
    "MLA",
    "MLP",
    "AutoModel",
    "AutoTokenizer",
    "BaseFactory",
    "ChatTemplate",
    "Checkpoint",
    "ContiguousCache",
    "DecoderBlock",
    "Embedding",
    "IncrementalDecoder",
    "KVSpec",
    "Linear",
    "LoRAAdapter",
    "LoRAConfig",
    "MoE",
    "ModelConfig",
    "PagedCache",
    "RMSNorm",
    "Registry",
    "RotaryEmbedding",
    "Transformer",
    "atomic_dir",
    "atomic_file",
    "generate",
    "get_preset",
    "moe_layers",
    "remove_stale_temps",
]
