"""`AutoModel`: the base of every model class, a registry of model types, and loading/saving of
model folders (ours and Hugging Face `llama`/`qwen2`/`qwen3`/`qwen3_moe`/`mixtral`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import nn

from astrai_core.atomic import atomic_dir
from astrai_core.factory import BaseFactory, Registry
from astrai_core.model import hf
from astrai_core.model.config import ModelConfig, read_config_file
from astrai_core.model.weights import load_weights, save_weights

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
CONFIG_NAME = "config.json"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, stored: str) -> torch.dtype:
    """None picks fp32 on CPU (no bf16 units on most CPUs) and the stored dtype elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else DTYPES[stored]
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of: float32, bfloat16, float16")
    return DTYPES[dtype]


def read_config(folder: Path) -> tuple[str, ModelConfig, bool]:
    """-> (registered model type to build, its config, whether the folder is Hugging Face's)."""
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not path.is_file():
        if (folder / "adapter_config.json").is_file():  # a LoRA adapter or a LoRA run's checkpoint
            raise FileNotFoundError(
                f"{folder} is a LoRA adapter, not a model folder; merge it into its base first: "
                f"astrai model merge-lora BASE {folder} --out DIR")
        raise FileNotFoundError(f"{path} is missing; a model folder needs config.json and weights")
    raw = read_config_file(path)
    model_type = raw.get("model_type", "astrai")
    if not isinstance(model_type, str):
        raise ValueError(f"{path}: model_type must be a string such as \"astrai\" or \"llama\", "
                         f"got {model_type!r}; fix the file or copy the model folder again")
    if hf.is_hf_model_type(model_type):
        return "astrai", hf.config_from_hf(raw), True
    if model_type not in AutoModel._registry:
        supported = sorted({*AutoModel._registry.list_names(), *hf.HF_CONFIG_ADAPTERS})
        raise ValueError(
            f"{path}: model_type '{model_type}' is not supported; AstrAI loads: {', '.join(supported)}"
        )
    return model_type, ModelConfig.from_dict(raw), False


class AutoModel(nn.Module, BaseFactory):
    """Base class of AstrAI models. `AutoModel.from_pretrained(dir)` picks the class from
    `config.json`'s `model_type`."""

    _registry: ClassVar[Registry] = Registry(kind="model type")
    _share_registry: ClassVar[bool] = True  # subclasses register into this one registry
    config: ModelConfig

    @classmethod
    def get_model_class(cls, model_type: str) -> type[AutoModel]:
        return cls._registry.get(model_type)

    @classmethod
    def from_config(cls, config: ModelConfig) -> AutoModel:
        return cls.get_model_class("astrai")(config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        disable_random_init: bool = True,
    ) -> AutoModel:
        """Load a model folder. dtype: float32/bfloat16/float16 (default fp32 on CPU)."""
        folder = Path(path)
        model_type, config, from_hf = read_config(folder)
        device = torch.device(device or "cpu")
        target = resolve_dtype(dtype, device, config.torch_dtype)
        with torch.device("meta"):
            model = cls.get_model_class(model_type)(config)
        state = load_weights(folder)
        if from_hf:
            try:
                state = hf.state_dict_from_hf(state, config)
            except ValueError as exc:  # per-expert tensors missing
                raise ValueError(f"{folder}: {exc}") from None
        model.load_weights(state, dtype=target, device=device, source=folder)
        return model.eval()

    def load_weights(
        self, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, source: Path
    ) -> None:
        """Assign `state` into a (possibly meta) model, checking names and shapes."""
        expected = dict(self.state_dict(keep_vars=True))
        tied = self.config.tie_weight
        if tied:
            expected.pop("lm_head.weight", None)
            state.pop("lm_head.weight", None)  # some exports store the tied copy too
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
            raise ValueError(f"weights in {source} do not match config.json: {'; '.join(parts)}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"weights in {source}: '{name}' has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(expected[name].shape)}"
                )
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        if tied:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        self.load_state_dict(state, strict=True, assign=True)
        if tied:  # assign=True replaced the Parameter objects; tie them again
            self.lm_head.weight = self.embed_tokens.weight

    def save_pretrained(
        self, save_directory: str | os.PathLike, max_shard_bytes: int | None = None
    ) -> None:
        """Write config.json and safetensors into save_directory, atomically (temp dir + rename).
        Files of an existing folder that are not the model's (tokenizer, generation config) stay."""
        target = Path(save_directory)
        with atomic_dir(target) as tmp:
            self.write_model_files(tmp, max_shard_bytes)
            _keep_other_files(target, tmp)

    def write_model_files(self, folder: Path, max_shard_bytes: int | None = None) -> None:
        dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        config = ModelConfig.from_dict(
            {**self.config.to_dict(), "model_type": "astrai",
             "torch_dtype": dtype_name.get(next(self.parameters()).dtype, "float32")}
        )
        config.save(folder / CONFIG_NAME)
        state = self.state_dict()
        if self.config.tie_weight:
            state.pop("lm_head.weight", None)  # safetensors refuses shared tensors; it is re-tied on load
        save_weights(state, folder, max_shard_bytes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to(self, *args: Any, **kwargs: Any) -> Self:  # typed to return the model
        return super().to(*args, **kwargs)


def _keep_other_files(old: Path, new: Path) -> None:
    """Carry the files of the folder being replaced that the model does not own (tokenizer,
    generation config) into the new one. Hard links, not moves: until the swap the old folder
    stays complete, so a crash in between loses nothing."""
    if not old.is_dir():
        return
    for item in old.iterdir():
        if (new / item.name).exists() or item.name.startswith("model"):
            continue
        if item.is_dir():
            shutil.copytree(item, new / item.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, new / item.name)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)
