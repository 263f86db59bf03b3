"""`Checkpoint`: model weights plus any training state, saved as a model folder.

Layout (a checkpoint is itself a model folder that `AutoModel.from_pretrained` loads):

    config.json, model.safetensors          the model (tied lm_head stored once)
    trainer_state.json                      epoch, iteration, format version, state group names
    <group>.json + <group>.safetensors      one per state group (optimizer, scheduler, sampler,
                                            rng, ...): nested Python state with every tensor
                                            moved to safetensors and the rest kept as JSON

A LoRA run's checkpoint holds `adapter_config.json` + `adapter_model.safetensors` (PEFT's adapter
folder, model/adapter.py) in place of config.json and the full weights: the base stays where
the run loaded it from, and `astrai model merge-lora BASE CKPT` makes a model folder of both.

Everything is written to a temporary sibling folder and renamed into place (`atomic_dir`), so a
crash never leaves a half-written checkpoint; nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from astrai_core.atomic import atomic_dir
from astrai_core.model.adapter import ADAPTER_CONFIG, LoRAAdapter
from astrai_core.model.config import ModelConfig
from astrai_core.model.weights import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    load_safetensors,
    load_weights,
    save_weights,
)

FORMAT_VERSION = 1
STATE_NAME = "trainer_state.json"


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace each tensor in a nested structure by a reference into `tensors` (JSON-safe)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state at '{path}' has keys that are neither str nor int")
        return {"__dict__": [[k, flatten_state(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{path}' in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:  # keeps int keys (optimizer state is keyed by parameter index)
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    epoch: int = 0
    iteration: int = 0
    config: ModelConfig | None = None
    states: dict[str, Any] = field(default_factory=dict)  # group name -> nested state
    files: dict[str, Path] = field(default_factory=dict)  # extra files to copy in (tokenizer)
    # A LoRA run's checkpoint holds its adapter (PEFT's files) instead of full weights.
    adapter: LoRAAdapter | None = None

    def save(self, save_dir: str | os.PathLike) -> Path:
        target = Path(save_dir)
        with atomic_dir(target) as tmp:
            self._write(tmp)
        return target

    def _write(self, folder: Path) -> None:
        state = dict(self.state_dict)
        if self.config is not None:
            self.config.save(folder / "config.json")
            if self.config.tie_weight:
                state.pop("lm_head.weight", None)
        if state or self.adapter is None:
            save_weights(state, folder)
        if self.adapter is not None:
            self.adapter.write(folder)
        for name, group in self.states.items():
            tensors: dict[str, torch.Tensor] = {}
            skeleton = flatten_state(group, tensors)
            (folder / f"{name}.json").write_text(json.dumps(skeleton))
            if tensors:
                save_file(tensors, str(folder / f"{name}.safetensors"))
        meta = {"format_version": FORMAT_VERSION, "epoch": self.epoch,
                "iteration": self.iteration, "groups": sorted(self.states)}
        (folder / STATE_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        for name, source in self.files.items():
            shutil.copy2(source, folder / name)

    @classmethod
    def load(cls, save_dir: str | os.PathLike) -> Checkpoint:
        folder = Path(save_dir)
        meta_path = folder / STATE_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a training checkpoint ({STATE_NAME} is missing); "
                "to start from a model folder, pass it as the model instead of resuming"
            )
        meta = _read_json(meta_path, dict)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: checkpoint format {meta.get('format_version')} is not "
                f"{FORMAT_VERSION}, which this AstrAI version reads"
            )
        config = ModelConfig.load(folder / "config.json") if (folder / "config.json").is_file() else None
        adapter = LoRAAdapter.load(folder) if (folder / ADAPTER_CONFIG).is_file() else None
        has_weights = (folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()
        state_dict = load_weights(folder) if has_weights or adapter is None else {}
        if config is not None and config.tie_weight and "embed_tokens.weight" in state_dict:
            state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
        states = {}
        try:
            groups, epoch, iteration = list(meta["groups"]), int(meta["epoch"]), int(meta["iteration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{meta_path}: not a valid checkpoint state ({exc!r} is missing or "
                             "malformed); the checkpoint is damaged") from None
        for name in groups:
            tensor_file = folder / f"{name}.safetensors"
            tensors = load_safetensors(tensor_file) if tensor_file.is_file() else {}
            states[name] = unflatten_state(_read_json(folder / f"{name}.json", object), tensors)
        return cls(state_dict, epoch, iteration, config, states, adapter=adapter)


def _read_json(path: Path, kind: type) -> Any:
    """A checkpoint's JSON file; a missing, unreadable or wrongly shaped one is a damaged
    checkpoint, said in one line (resume then falls back to an older checkpoint)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); the checkpoint is damaged") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, not an object; the "
                         "checkpoint is damaged")
    return value
