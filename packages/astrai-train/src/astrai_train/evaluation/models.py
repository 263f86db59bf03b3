"""The models `astrai eval` compares: a model folder (ours, a training checkpoint, a Hugging
Face llama/qwen2/qwen3 folder) with its tokenizer, or a model in memory (training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EvalModel:
    name: str  # the column header of the results table
    model: nn.Module
    tokenizer: Any  # an astrai-core AutoTokenizer
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_seq_len(self) -> int:
        return int(self.model.config.max_seq_len)


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | None, device: str) -> str | None:
    """auto: bf16 on a CPU that computes it natively (astrai_core.capability), fp32 on other
    CPUs, the stored dtype on a GPU (what `astrai serve` loads, so scores match serving)."""
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        return dtype
    if device.startswith("cpu"):
        from astrai_core.capability import compute_dtype

        return str(compute_dtype("cpu")).removeprefix("torch.")
    return None


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model folder not found")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a model folder (from `astrai "
                                "model init`, a training checkpoint, or a Hugging Face folder)")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer.json); copy the tokenizer "
                                f"files in: `cp TOKENIZER_DIR/tokenizer*.json {path}/`")


def load_eval_model(path: Path, device: str | None = None, dtype: str | None = None,
                    name: str | None = None) -> EvalModel:
    from astrai_core import AutoModel, AutoTokenizer

    check_model_dir(path)
    device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=resolve_dtype(dtype, device), device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"only {model.config.vocab_size}; they do not belong together")
    p = next(model.parameters())
    info = {"parameters": sum(t.numel() for t in model.parameters()),
            "dtype": str(p.dtype).removeprefix("torch."), "device": str(p.device),
            "max_seq_len": int(model.config.max_seq_len)}
    return EvalModel(name or path.name, model.eval(), tokenizer, path, info)


def column_names(paths: list[Path]) -> list[str]:
    """Folder names, or longer paths where two folders share a name (runs/a/final, runs/b/final)."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]
