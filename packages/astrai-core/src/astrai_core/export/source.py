"""What every export reads: the model folder's config, its weights under our names, and its
tokenizer (ours or a Hugging Face one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from astrai_core.model.automodel import AutoModel, read_config
from astrai_core.model.config import ModelConfig
from astrai_core.tokenizer import AutoTokenizer
from astrai_core.tokenizer.hf_folder import TOKENIZER_FILE

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ExportSource:
    folder: Path
    config: ModelConfig
    state: dict[str, torch.Tensor]  # our parameter names; a tied lm_head is left out
    tokenizer: AutoTokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.state["embed_tokens.weight"].dtype


def load_source(folder: Path) -> ExportSource:
    """Read a model folder (ours, a checkpoint, or Hugging Face llama/qwen2/qwen3) in its stored
    dtype. A folder without a tokenizer cannot be exported: the result would not be runnable."""
    folder = Path(folder)
    _, config, _ = read_config(folder)  # the clear errors for a missing or broken folder
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {TOKENIZER_FILE}; an exported model needs its tokenizer. Copy it "
            f"in (`cp TOKENIZER_DIR/tokenizer*.json {folder}/`) and export again")
    model = AutoModel.from_pretrained(folder, dtype=config.torch_dtype)
    state = dict(model.state_dict())
    if config.tie_weight:
        state.pop("lm_head.weight", None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"only {config.vocab_size}; they do not belong together")
    return ExportSource(folder, config, state, tokenizer)
