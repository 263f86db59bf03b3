"""Export a model folder to the formats other runtimes read: a Hugging Face folder
(transformers, vLLM) and a GGUF file (llama.cpp, Ollama). Features a format cannot hold are
refused up front, by name, before anything is written."""

from astrai_core.export.gguf import (
    GGUF_TYPES,
    export_gguf,
    gguf_tensor_name,
    unsupported_gguf_features,
)
from astrai_core.export.hf import export_hf
from astrai_core.export.source import ExportSource, load_source

FORMATS = ("hf", "gguf")

__all__ = [
    "FORMATS", "GGUF_TYPES", "ExportSource", "export_gguf", "export_hf", "gguf_tensor_name",
    "load_source", "unsupported_gguf_features",
]
