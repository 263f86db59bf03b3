"""`ServedAdapters`: several LoRA adapters served beside their base model, in the same batches.

Each adapter is a PEFT-format folder (astrai_core.model.adapter) trained on this base. Every
layer that some adapter targets is wrapped, whatever serving kernel it became (`prepare_model`:
oneDNN-packed, int8 or plain), in a `PerRowLoRA` that adds, to each token of the packed batch,
the update of that token's own adapter:

    y = base(x) + scaling_a * (x A_a^T) B_a^T,    a = the adapter of the token's request

through astrai-core's `AdapterBank` (every adapter stacked, one masked GEMM pair: no loop over
adapters or tokens). A request's adapter is an id: 0 is the base model (no update), i >= 1 the
i-th adapter served. The model runner sets the id of every token before each forward (`applied`)
and clears it after, so any other forward of the model computes the plain base.

The id is also the request's prefix-cache namespace (`KVCache.task_alloc`): K/V computed with one
adapter are never reused by a request for another, or for the base.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from astrai_core.model.adapter import LoRAAdapter
from astrai_core.model.lora import UNSUPPORTED_TARGETS, AdapterBank

BASE_ID = 0  # the adapter id of a request for the base model
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")  # what a client may send as `model`


class UnknownAdapterError(ValueError):
    """A request names an adapter this engine does not serve."""


def parse_lora_option(text: str) -> tuple[str, Path]:
    """`--lora NAME=DIR` -> (NAME, DIR); ValueError with the expected form otherwise."""
    name, sep, folder = text.partition("=")
    name, folder = name.strip(), folder.strip()
    if not sep or not name or not folder:
        raise ValueError(f"--lora '{text}': write --lora NAME=DIR, e.g. --lora "
                         "sql=runs/sql-lora/final (NAME is what clients send as `model`)")
    if not _NAME.fullmatch(name):
        raise ValueError(f"--lora '{text}': the name '{name}' may hold only letters, digits and "
                         "._:/- and must start with a letter or digit")
    return name, Path(folder)


def lora_folders(options: list[str], base_name: str) -> dict[str, Path]:
    """The `--lora NAME=DIR` options as name -> folder, each folder read once to fail now (in
    one line) on a bad form, a duplicate or the base's own name, or a folder that is not an
    adapter, rather than after the server started."""
    folders: dict[str, Path] = {}
    for text in options:
        name, folder = parse_lora_option(text)
        if name in folders or name == base_name:
            raise ValueError(f"--lora {name}: the name is already taken by "
                             f"{'another --lora' if name in folders else 'the base model'}; "
                             "give every adapter its own name")
        if not folder.is_dir():
            raise FileNotFoundError(f"--lora {name}: {folder} is not a folder; pass the adapter "
                                    "folder (adapter_config.json + adapter_model.safetensors)")
        _read(name, folder)
        folders[name] = folder
    return folders


@dataclass
class _Rows:
    """The adapter bank index of every token of the forward in progress (None: no adapter);
    one object shared by all wrapped layers, so the runner sets it once per forward."""

    rows: torch.Tensor | None = None


class PerRowLoRA(nn.Module):
    """A serving layer (any module with in_features/out_features) plus the per-token update of
    every served adapter that targets it."""

    def __init__(self, base: nn.Module, bank: AdapterBank, context: _Rows) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.in_features, self.out_features = base.in_features, base.out_features
        self._context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self._context.rows
        if rows is None:
            return out
        return out + self.bank.delta(x, rows).to(out.dtype)

    def extra_repr(self) -> str:
        n, r = self.bank.A.shape[:2]
        return f"{n} adapters, rank <= {r}"


class ServedAdapters:
    """The adapters installed into one base model, by name (ids 1..n in the order given)."""

    def __init__(self, names: list[str], context: _Rows, device: torch.device) -> None:
        self.names = tuple(names)
        self._ids = {name: i + 1 for i, name in enumerate(names)}
        self._context = context
        self._device = device

    @classmethod
    def load(cls, model: nn.Module, folders: Mapping[str, str | Path]) -> ServedAdapters:
        """Read and check each adapter folder (name -> folder) against `model`, then wrap the
        targeted layers of `model` in place. Call after `prepare_model(..., fuse=False)`,
        before the engine: the adapters wrap the separate q/k/v and gate/up projections."""
        if not folders:
            raise ValueError("no adapter to serve: give at least one --lora NAME=DIR")
        if any(getattr(m, "qkv_proj", None) is not None or getattr(m, "gate_up_proj", None) is not None
               for m in model.modules()):
            raise ValueError("this model's projections are fused for serving (prepare_model); "
                             "LoRA adapters need them apart: call prepare_model(model, quantize, "
                             "fuse=False) before ServedAdapters.load")
        adapters = {name: _read(name, Path(folder)) for name, folder in folders.items()}
        for name, adapter in adapters.items():
            _check_fits(name, adapter, model)
        param = next(model.parameters())
        context = _Rows()
        pairs = [(a.config, a.state) for a in adapters.values()]
        layers = sorted({n for a in adapters.values() for n in a.layer_names})
        for layer in layers:
            base = model.get_submodule(layer)
            bank = AdapterBank.stack(layer, base.in_features, base.out_features, pairs,
                                     param.dtype, param.device)
            _set_module(model, layer, PerRowLoRA(base, bank, context))
        return cls(list(adapters), context, param.device)

    def id_of(self, name: str | None) -> int:
        """The adapter id of a request: 0 for None (the base), else its adapter's."""
        if name is None:
            return BASE_ID
        found = self._ids.get(name)
        if found is None:
            raise UnknownAdapterError(f"no LoRA adapter named '{name}' is served; the adapters "
                                      f"are {', '.join(self.names)} (or none, for the base model)")
        return found

    @contextmanager
    def applied(self, ids: torch.Tensor) -> Iterator[None]:
        """Within the block, every forward gives token (or row) i adapter ids[i] (0: none);
        `ids` has the shape of the input ids, or of their first axes."""
        self._context.rows = ids.to(self._device) - 1  # the bank's index: -1 is no adapter
        try:
            yield
        finally:
            self._context.rows = None


def _read(name: str, folder: Path) -> LoRAAdapter:
    try:
        return LoRAAdapter.load(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"adapter '{name}': {exc}") from None


def _check_fits(name: str, adapter: LoRAAdapter, model: nn.Module) -> None:
    """ValueError naming the adapter and the fix if `adapter` was not trained on `model`."""
    r = adapter.config.rank
    for layer in adapter.layer_names:
        short = layer.rsplit(".", 1)[-1]
        if short in UNSUPPORTED_TARGETS:
            raise ValueError(f"adapter '{name}' adapts {layer}, which serving does not support "
                             f"({UNSUPPORTED_TARGETS[short]}); merge it instead: astrai model "
                             "merge-lora BASE ADAPTER --out DIR")
        try:
            base = model.get_submodule(layer)
        except AttributeError:
            base = None
        if base is None or not hasattr(base, "in_features"):
            raise ValueError(f"adapter '{name}' adapts {layer}, which is not a linear layer of "
                             "this base model: it was trained on another base; serve it with "
                             "the model it was trained on")
        a, b = (adapter.state.get(f"{layer}.lora_{k}.weight") for k in "AB")
        if a is None or b is None:
            raise ValueError(f"adapter '{name}' has only one of {layer}'s two LoRA factors "
                             "(lora_A, lora_B); the adapter is incomplete, save it again")
        want_a, want_b = (r, base.in_features), (base.out_features, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(
                f"adapter '{name}': {layer} has LoRA factors {tuple(a.shape)} and "
                f"{tuple(b.shape)}, but rank {r} on this base needs {want_a} and {want_b}: it "
                "was trained on another base (or its adapter_config.json's r is wrong); serve "
                "it with the model it was trained on")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
