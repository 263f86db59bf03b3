"""LoRA adapter folders in PEFT's format, so `peft` loads ours and we load its:

    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...

The tensor names are PEFT's for a Hugging Face Llama/Qwen3 base: PeftModel's `base_model.model.`
in front of the Hugging Face parameter name, without the adapter name (PEFT drops `.default`
when it saves). Our names are the Hugging Face ones without `model.` (model/hf.py), so the
mapping is one prefix. Features of PEFT's LoRA that we do not compute (DoRA, trained biases,
per-layer ranks, extra saved modules) are refused by name when an adapter is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from astrai_core.atomic import atomic_dir
from astrai_core.model.hf import HF_PREFIX
from astrai_core.model.lora import (
    LoRAConfig,
    apply_lora,
    is_lora_parameter,
    load_lora_state_dict,
    lora_config_of,
    lora_state_dict,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the Hugging Face CausalLM
# adapter_config.json keys whose non-default values change what the adapter computes.
UNSUPPORTED_PEFT_KEYS = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "rank_pattern": "per-layer ranks (rank_pattern)", "alpha_pattern": "per-layer alphas "
    "(alpha_pattern)", "modules_to_save": "fully trained extra modules (modules_to_save)",
    "lora_bias": "trained LoRA biases (lora_bias)", "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable token indices", "use_qalora": "QA-LoRA",
    "target_parameters": "target_parameters (LoRA on bare parameters)",
}


def to_peft_name(name: str) -> str:
    return PEFT_PREFIX + HF_PREFIX + name


def from_peft_name(name: str) -> str:
    inner = name.removeprefix(PEFT_PREFIX)
    if inner == name or not inner.startswith(HF_PREFIX):
        raise ValueError(f"adapter tensor '{name}' is not named as PEFT names the adapters of a "
                         f"Llama/Qwen base ({PEFT_PREFIX}{HF_PREFIX}layers.N....lora_A.weight)")
    inner = inner.removeprefix(HF_PREFIX)
    if not is_lora_parameter(inner):
        raise ValueError(f"adapter tensor '{name}' is not a LoRA factor (lora_A/lora_B weight); "
                         "only plain LoRA adapters are supported")
    return inner


@dataclass
class LoRAAdapter:
    """An adapter: its config and weights under our parameter names."""

    config: LoRAConfig
    state: dict[str, torch.Tensor]
    base_model: str | None = None  # base_model_name_or_path: where the base came from

    @classmethod
    def from_model(cls, model: nn.Module, base_model: str | None = None) -> LoRAAdapter:
        return cls(lora_config_of(model), lora_state_dict(model), base_model)

    @property
    def layer_names(self) -> list[str]:
        return sorted({n.rsplit(".lora_", 1)[0] for n in self.state})

    def peft_config(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
            "revision": None, "r": cfg.rank, "lora_alpha": cfg.resolved_alpha,
            "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
            "use_rslora": cfg.use_rslora, "use_dora": False, "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "exclude_modules": None,
        }

    def write(self, folder: Path) -> None:
        """Write both files into an existing folder (the caller makes it atomic)."""
        (folder / ADAPTER_CONFIG).write_text(json.dumps(self.peft_config(), indent=2) + "\n")
        tensors = {to_peft_name(n): t.detach().cpu().contiguous() for n, t in self.state.items()}
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    def save(self, out: str | Path) -> Path:
        target = Path(out)
        with atomic_dir(target) as tmp:
            self.write(tmp)
        return target

    @classmethod
    def load(cls, folder: str | Path) -> LoRAAdapter:
        folder = Path(folder)
        config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} is not a LoRA adapter folder ({ADAPTER_CONFIG} is "
                                    "missing); pass the folder a LoRA run or peft saved")
        if not weights_path.is_file():
            hint = " (pickle adapter_model.bin is never loaded: re-save with safetensors)" if (
                folder / "adapter_model.bin").is_file() else ""
            raise FileNotFoundError(f"{weights_path} is missing{hint}; the adapter is incomplete")
        raw = _read_json(config_path)
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{weights_path}: not a readable safetensors file ({exc}); "
                             "the adapter is damaged, save it again") from None
        state = {from_peft_name(n): t for n, t in tensors.items()}
        if not state:
            raise ValueError(f"{weights_path} holds no LoRA weights")
        # The layers adapted are the ones the file has weights for (PEFT's target_modules may
        # be a regex or all-linear; layers_to_transform may restrict it).
        targets = tuple(sorted({n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in state}))
        return cls(config_from_peft(raw, config_path, targets), state,
                   raw.get("base_model_name_or_path"))

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Add this adapter to a base model (in place) and load its weights."""
        names = self.layer_names
        missing = [n for n in names if not _has_module(model, n)]
        if missing:
            raise ValueError(f"the adapter adapts {missing[0]}, which this base model does not "
                             "have: it was trained on another architecture")
        apply_lora(model, self.config, names=names)
        load_lora_state_dict(model, {n: t.to(_param_dtype(model)) for n, t in self.state.items()})
        return model


def config_from_peft(raw: dict[str, Any], where: Path | str, targets: tuple[str, ...]
                     ) -> LoRAConfig:
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {raw.get('peft_type')!r}; only LORA adapters "
                         "are supported")
    found = [text for key, text in UNSUPPORTED_PEFT_KEYS.items() if raw.get(key)]
    if raw.get("bias", "none") != "none":
        found.append(f"bias '{raw['bias']}' (trained biases)")
    if found:
        raise ValueError(f"{where}: the adapter uses {', '.join(found)}, which AstrAI does not "
                         "compute; only plain LoRA (r, lora_alpha, lora_dropout, use_rslora) is "
                         "supported")
    try:
        return LoRAConfig(rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                          dropout=float(raw.get("lora_dropout", 0.0)), targets=targets,
                          use_rslora=bool(raw.get("use_rslora")))
    except KeyError as exc:
        raise ValueError(f"{where}: lacks {exc}, which every LoRA adapter config has") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); the adapter is damaged") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def save_adapter(model: nn.Module, out: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter of `model` as a PEFT adapter folder at `out` (atomically)."""
    return LoRAAdapter.from_model(model, base_model).save(out)


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add the adapter saved in `folder` to `model` (in place)."""
    return LoRAAdapter.load(folder).apply_to(model)
