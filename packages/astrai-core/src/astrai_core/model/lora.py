"""LoRA (Hu et al., 2021): low-rank adapters on the named linear layers of the decoder blocks.

`apply_lora(model, LoRAConfig(rank=8))` replaces each targeted `Linear` (q_proj, ..., down_proj)
by a `LoRALinear` that keeps the very same weight and bias Parameters and adds

    y = x W^T + b + scaling * dropout(x) A^T B^T,     A (r, in), B (out, r), scaling = alpha / r

with A drawn as PEFT draws it (Kaiming-uniform) and B zero, so the adapted model starts equal
to the base. Everything but A and B is frozen. The parameter names are the base's plus
`<layer>.lora_A.weight` / `<layer>.lora_B.weight`, which map one to one onto the names PEFT
writes (see `adapter.py`), and the base weights keep their names: checkpoints, exports and the
serving engine see the same model.

`adapters_disabled(model)` runs the base alone (the DPO/GRPO reference: no second copy of the
weights). For serving several adapters in one batch, a `LoRALinear` also applies a stack of
adapters per row (`AdapterBank`, `adapter_rows`): row i of the batch gets adapter rows[i]. The
same bank is what `astrai serve --lora` installs around its serving kernels (astrai_serve.adapters).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from astrai_core.model.linear import Linear

ALL_LINEAR = "all-linear"  # PEFT's name for "every linear layer but the output head"
# The projections of the blocks, in the order PEFT's configs usually list them.
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# MLA's decode path reads kv_b_proj.weight directly (weight absorption), past forward: an
# adapter there would be applied in training but not in cached generation.
UNSUPPORTED_TARGETS = {"kv_b_proj": "MLA's cached decode multiplies kv_b_proj.weight directly, "
                                    "so an adapter on it would be ignored when generating"}
LORA_PARAM = re.compile(r"\.lora_[AB]\.weight$")


@dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (the update is scaled by alpha / r; with `use_rslora`, alpha / sqrt(r)),
    dropout on the adapter's input, and the layer names to adapt (`all-linear`: every linear
    layer inside the blocks)."""

    rank: int = 8
    alpha: float | None = None  # None: 2 * rank (scale 2)
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = tuple(self.targets) if not isinstance(self.targets, str) else (self.targets,)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError("LoRA targets must name layers, e.g. q_proj,v_proj or all-linear")
        object.__setattr__(self, "targets", targets)

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def scaling(self) -> float:
        denominator = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.resolved_alpha / denominator

    @classmethod
    def from_targets_text(cls, text: str, **fields) -> LoRAConfig:
        """`--lora-targets q_proj,v_proj` -> targets ("q_proj", "v_proj")."""
        return cls(targets=tuple(t.strip() for t in text.split(",") if t.strip()), **fields)


class LoRAWeight(nn.Module):
    """One factor of an adapter: a bare weight, so the parameter is named `lora_A.weight`."""

    def __init__(self, rows: int, cols: int, like: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=like.dtype, device=like.device))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


@dataclass
class AdapterBank:
    """Several adapters of one layer, stacked for per-row application (serving): A (n, r, in),
    B (n, out, r) with each B already multiplied by its adapter's scaling. Adapters of lower
    rank are zero-padded to r, which changes nothing (the padded products are 0).

    `delta` runs every adapter's down-projection on every row as one GEMM, (T, in) x (in, n r),
    zeroes the blocks that are not the row's own adapter (a row of -1 keeps none), and
    up-projects with one more GEMM, (T, n r) x (n r, out): no Python loop, no host sync, and
    a batch mixing adapters costs the same as one using a single adapter. Gathering A[rows] per
    token instead would materialize T x r x in weights per layer (512 MiB for a 2048-token step
    at r = 16, in = 4096); the masked extra work is n r / in of the layer's own matmul, small
    for the handful of adapters one server holds."""

    A: torch.Tensor
    B: torch.Tensor
    rows: torch.Tensor | None = field(default=None)  # adapter index per row, -1: none

    def __post_init__(self) -> None:
        n, r, _ = self.A.shape
        self._down = self.A.reshape(n * r, -1)  # (n r, in): all down-projections side by side
        self._up = self.B.transpose(1, 2).reshape(n * r, -1).contiguous()  # (n r, out)

    @classmethod
    def stack(cls, name: str, in_features: int, out_features: int,
              adapters: Sequence[tuple[LoRAConfig, dict[str, torch.Tensor]]],
              dtype: torch.dtype, device: torch.device | str) -> AdapterBank:
        """Layer `name`'s factors of each adapter (config, weights under our names), in order;
        an adapter that does not adapt the layer gets zeros."""
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        rank = max((cfg.rank for cfg, state in adapters if a_key in state), default=1)
        A = torch.zeros(len(adapters), rank, in_features, dtype=dtype, device=device)
        B = torch.zeros(len(adapters), out_features, rank, dtype=dtype, device=device)
        for i, (cfg, state) in enumerate(adapters):
            if a_key in state:
                A[i, :cfg.rank] = state[a_key].to(A)
                # The scaling in fp32 at least, before the cast: as `delta_weight` merges it.
                scaled = state[b_key].to(torch.promote_types(B.dtype, torch.float32)) * cfg.scaling
                B[i, :, :cfg.rank] = scaled.to(B)
        return cls(A, B)

    def delta(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """B[rows[i]] A[rows[i]] x_i for each row i of x (..., in), 0 where rows[i] is -1; rows
        has x's leading shape, or only its first axes (a row index then covers all its tokens)."""
        while rows.dim() < x.dim() - 1:
            rows = rows.unsqueeze(-1)
        flat_rows = rows.expand(x.shape[:-1]).reshape(-1)
        flat = x.reshape(-1, x.shape[-1])
        n, r = self.A.shape[:2]
        h = flat @ self._down.T.to(flat.dtype)  # (T, n r)
        own = flat_rows[:, None] == torch.arange(n, device=flat_rows.device)  # (T, n)
        h = (h.view(-1, n, r) * own.unsqueeze(-1).to(h.dtype)).view(-1, n * r)
        return (h @ self._up.to(flat.dtype)).view(*x.shape[:-1], self.B.shape[1])


class LoRALinear(nn.Module):
    """A base `Linear` (its own weight and bias Parameters, frozen) plus one trainable adapter,
    and optionally an `AdapterBank` applied per row."""

    def __init__(self, base: Linear, config: LoRAConfig | None) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_enabled = True
        self.bank: AdapterBank | None = None
        self.lora_A: LoRAWeight | None = None
        self.lora_B: LoRAWeight | None = None
        self.scaling = 0.0
        self.rank = 0
        self.lora_dropout: nn.Module = nn.Identity()
        self.lora_config = config
        if config is not None:
            self.rank, self.scaling = config.rank, config.scaling
            self.lora_A = LoRAWeight(config.rank, self.in_features, base.weight)
            self.lora_B = LoRAWeight(self.out_features, config.rank, base.weight)
            if config.dropout:
                self.lora_dropout = nn.Dropout(config.dropout)
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) (bound 1/sqrt(in)), B = 0: PEFT's default init."""
        if self.lora_A is not None:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None and self.lora_enabled:
            # (..., in) -> (..., r) -> (..., out), in PEFT's order: B(A(dropout(x))) * scaling
            delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A.weight), self.lora_B.weight)
            out = out + delta * self.scaling
        if self.bank is not None and self.bank.rows is not None:
            out = out + self.bank.delta(x, self.bank.rows).to(out.dtype)
        return out

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A (out, in), in at least fp32."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc)) * self.scaling

    def merged(self) -> Linear:
        """A plain `Linear` holding W + scaling * B A (computed in fp32, stored in W's dtype)."""
        linear = Linear(self.in_features, self.out_features, self.bias is not None)
        with torch.no_grad():
            weight = self.weight.detach()
            if self.lora_A is not None:
                weight = (weight.to(self.delta_weight().dtype) + self.delta_weight()).to(weight.dtype)
            linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, scaling={self.scaling:g}")


# -- applying, finding, switching ------------------------------------------------------------

def _block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear/LoRALinear inside the decoder blocks (`layers.`)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (Linear, LoRALinear)) and n.startswith("layers.")]


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The full names of the layers `targets` selects (short names such as q_proj, or
    all-linear); each short name must match a layer of this model."""
    linears = _block_linears(model)
    short = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
    wanted = set()
    for target in targets:
        if target == ALL_LINEAR:
            wanted.update(s for s in short if s not in UNSUPPORTED_TARGETS)
        elif target in UNSUPPORTED_TARGETS:
            raise ValueError(f"LoRA target '{target}' is not supported: "
                             f"{UNSUPPORTED_TARGETS[target]}; target the other layers")
        elif target not in short:
            raise ValueError(f"LoRA target '{target}' matches no layer of this model; its "
                             f"block layers are {', '.join(short)} (or all-linear)")
        else:
            wanted.add(target)
    return [n for n, _ in linears if n.rsplit(".", 1)[-1] in wanted]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig, names: Sequence[str] | None = None
               ) -> list[str]:
    """Adapt `model` in place: freeze every parameter, wrap the targeted layers (or exactly
    the full `names` given, as a saved adapter lists them) in `LoRALinear`, their adapters
    trainable. Returns the adapted layer names."""
    if lora_layers(model):
        raise ValueError("this model already has LoRA adapters; merge them first "
                         "(`astrai model merge-lora`) to train a new adapter on top")
    if getattr(model, "tensor_parallel_group", None) is not None:
        raise ValueError("LoRA on a tensor-parallel model is not supported: its projections are "
                         "sharded; train LoRA with data parallelism (--parallel ddp) instead")
    names = resolve_targets(model, config.targets) if names is None else list(names)
    if not names:
        raise ValueError("no layer of this model matches the LoRA targets")
    model.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), config))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of `model` that carry a trainable adapter, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and m.lora_A is not None}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def is_lora_parameter(name: str) -> bool:
    return LORA_PARAM.search(name) is not None


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig of an adapted model (rank and scaling are per model, as we apply them)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters")
    config = next(iter(layers.values())).lora_config
    targets = tuple(sorted({n.rsplit(".", 1)[-1] for n in layers}))
    return dataclasses.replace(config, targets=targets)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under our names (`layers.0.self_attn.q_proj.lora_A.weight`)."""
    return {n: p.detach() for n, p in model.named_parameters() if is_lora_parameter(n)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into an adapted model; the names and shapes must be exactly its own."""
    params = {n: p for n, p in model.named_parameters() if is_lora_parameter(n)}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError("the adapter does not fit this model's LoRA layers"
                         + (f"; missing {', '.join(missing[:3])}" if missing else "")
                         + (f"; unexpected {', '.join(unexpected[:3])}" if unexpected else "")
                         + ": use the same --lora-rank and --lora-targets as the run that wrote it")
    with torch.no_grad():
        for name, param in params.items():
            if state[name].shape != param.shape:
                raise ValueError(f"adapter weight {name} has shape {tuple(state[name].shape)}, "
                                 f"this model's is {tuple(param.shape)}: use the same --lora-rank")
            param.copy_(state[name])


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes as its base (every adapter off)."""
    layers = list(lora_layers(model).values())
    before = [layer.lora_enabled for layer in layers]
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, before, strict=True):
            layer.lora_enabled = state


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain Linear holding W + scaling * B A (in place);
    the result has exactly the base model's parameter names and nothing trainable added."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        _set_module(model, name, layer.merged())
    return model


def base_checksum(model: nn.Module) -> float:
    """A fingerprint of the frozen base weights (everything but the adapters)."""
    with torch.no_grad():
        return float(sum(p.double().sum() for n, p in model.named_parameters()
                         if not is_lora_parameter(n)))


# -- several adapters per batch (serving) ----------------------------------------------------

def install_bank(model: nn.Module, adapters: Sequence[tuple[LoRAConfig, dict[str, torch.Tensor]]]
                 ) -> None:
    """Stack `adapters` (config, weights under our names) into per-layer `AdapterBank`s, so
    that `adapter_rows(model, rows)` applies adapter rows[i] to batch row i. Layers that no
    adapter targets stay plain; a layer some adapter lacks gets zeros for it."""
    layer_names = sorted({n.rsplit(".lora_", 1)[0] for _, state in adapters for n in state})
    for name in layer_names:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, None)
            _set_module(model, name, module)
        module.bank = AdapterBank.stack(name, module.in_features, module.out_features, adapters,
                                        module.weight.dtype, module.weight.device)


@contextmanager
def adapter_rows(model: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Within the block, batch row i of every forward uses bank adapter rows[i] (-1: none)."""
    banks = [m.bank for m in model.modules() if isinstance(m, LoRALinear) and m.bank is not None]
    for bank in banks:
        bank.rows = rows
    try:
        yield
    finally:
        for bank in banks:
            bank.rows = None
