"""Build an `InferenceEngine` from a model folder: ours (`astrai model init`), a training
checkpoint, or a supported Hugging Face folder, with its tokenizer beside the weights."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from astrai_serve.adapters import ServedAdapters
from astrai_serve.engine import InferenceEngine
from astrai_serve.quantize import prepare_model

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "ki": 2**10, "mib": 2**20,
          "mi": 2**20, "gib": 2**30, "gi": 2**30, "tib": 2**40, "ti": 2**40}


@dataclass
class EngineOptions:
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str | None = None  # auto (None) / float32 / bfloat16 / float16: see `serving_dtype`
    max_batch_size: int = 64
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    max_seq_len: int | None = None
    quantize: str = "none"  # none / int8 (astrai_serve.quantize)
    lora: dict[str, Path] = field(default_factory=dict)  # LoRA adapters served: name -> folder

    def __post_init__(self) -> None:
        from astrai_serve.quantize import QUANTIZE_MODES

        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"unknown --quantize '{self.quantize}'; choose one of: "
                             f"{', '.join(QUANTIZE_MODES)}")
        if self.kv_cache_tokens is not None and self.kv_cache_bytes is not None:
            raise ValueError("give the KV cache size once: --kv-cache-tokens or "
                             "--kv-cache-memory, not both")


def parse_size(text: str) -> int:
    """Bytes in '8GiB', '512MB', '1.5G' or '1000000'."""
    match = _SIZE.fullmatch(text)
    unit = (match.group(2) or "").lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read '{text}' as a size; write e.g. 2GiB, 512MiB or 1e9")
    return int(float(match.group(1)) * _UNITS[unit])


def check_model_dir(path: Path) -> None:
    """Fail fast, with the fix, on a folder that cannot be served."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model folder not found")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; pass a model folder (from `astrai model init`, a "
            "training checkpoint, or a Hugging Face llama/qwen2/qwen3 folder)")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer (tokenizer.json). Copy one in: "
            f"`cp TOKENIZER_DIR/tokenizer*.json {path}/` with a folder written by "
            "`astrai tokenizer train`, or create the model with "
            "`astrai model init ... --tokenizer TOKENIZER_DIR`")
    from astrai_core.model.automodel import read_config  # imports torch: only once it is needed

    read_config(path)  # a config.json that is not a model config fails here too


def serving_dtype(dtype: str | None, device: str) -> str | None:
    """The dtype to load weights in. An explicit one wins; "auto" (None) is bf16 on a CPU with
    native bf16 (AVX512-BF16 or AMX, detected once in astrai_core.capability, shared with
    training), fp32 on other CPUs (emulated bf16 is far slower), the stored dtype on a GPU."""
    if dtype not in (None, "auto"):
        return dtype
    if device.startswith("cpu"):
        from astrai_core.capability import compute_dtype

        return str(compute_dtype("cpu")).removeprefix("torch.")
    return None


def load_engine(path: Path, options: EngineOptions | None = None) -> InferenceEngine:
    import torch

    from astrai_core import AutoModel, AutoTokenizer

    options = options or EngineOptions()
    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(path, dtype=serving_dtype(options.dtype, device), device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"only {model.config.vocab_size}; they do not belong together")
    # Before the engine starts: the model never knows. Then the adapters wrap the serving
    # kernels (which keep the base fast), around the projections left apart for them.
    prepare_model(model, options.quantize, fuse=not options.lora)
    adapters = ServedAdapters.load(model, options.lora) if options.lora else None
    return InferenceEngine(model, tokenizer, max_batch_size=options.max_batch_size,
                           max_seq_len=options.max_seq_len,
                           kv_cache_tokens=options.kv_cache_tokens,
                           kv_cache_bytes=options.kv_cache_bytes, adapters=adapters)
