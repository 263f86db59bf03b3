"""`TrainConfig`: everything a training run needs, typed, documented where declared, validated.

Fields hold either plain values (numbers, strings, flags: each has an `astrai train` flag and a
TOML key, and is stored in every checkpoint) or objects a Python caller passes in (the model, the
dataset, factories; `metadata["cli"]` is False for those).
"""

# `_opt`/`_obj` return dataclasses.field(...) with help metadata; ruff cannot see through them.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from astrai_train.parallel.wrap import PARALLEL_MODES

DEVICE_TYPES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
DPO_REDUCTIONS = ("mean", "sum")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A field with a default and its help text (shown by `astrai train --help`)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def _obj(help: str) -> Any:
    """A field holding a Python object: set from code, no CLI flag, not saved in checkpoints."""
    return field(default=None, metadata={"help": help, "cli": False})


@dataclass
class TrainConfig:
    # -- what to train (objects, set from Python or by `astrai train`) -------------------
    model: nn.Module | None = _obj("The model to train (an AstrAI Transformer).")
    dataset: Dataset | None = _obj("Map-style dataset of the strategy's items (docs/contracts.md).")
    optimizer_fn: Callable[..., Any] | None = _obj(
        "params -> Optimizer; default AdamW from the optimizer fields below.")
    scheduler_fn: Callable[..., Any] | None = _obj(
        "optimizer -> LR scheduler; default from `scheduler` and its fields.")
    parallel_wrapper: Callable[..., Any] | None = _obj(
        "model -> wrapped model; overrides `parallel` (e.g. a custom FSDP/TP plan).")
    state_dict_fn: Callable[..., Any] | None = _obj(
        "model -> state dict to checkpoint; default model.state_dict().")

    # -- strategy ------------------------------------------------------------------------
    strategy: str = _opt("seq", "Training strategy: seq, sft, dpo or grpo.")
    label_smoothing: float = _opt(0.0, "SEQ/SFT cross-entropy label smoothing, in [0, 1).")
    dpo_beta: float = _opt(0.1, "DPO temperature beta on the log-ratio difference.")
    dpo_reduction: str = _opt("mean", "DPO reduction over the pairs of a step: mean or sum.")
    grpo_clip_eps: float = _opt(0.2, "GRPO ratio clip: ratios are clipped to [1-eps, 1+eps].")
    grpo_kl_coef: float = _opt(0.04, "GRPO weight lambda of the squared log-ratio KL term.")
    grpo_group_size: int | None = _opt(
        None, "GRPO responses per prompt; checked against the data (unset: taken from it).")
    grpo_online: bool = _opt(
        False, "Online GRPO: sample each group from the live policy through astrai-serve and "
        "score it with --reward (needs the rl extra of astrai-train; the data holds prompts only).",
        flag="online")
    grpo_reward: str = _opt(
        "exact_answer", "Online GRPO reward: a built-in (exact_answer, format) or "
        "module:function; several, comma-separated, are averaged.", flag="reward")
    grpo_max_new_tokens: int = _opt(64, "Online GRPO: tokens per sampled response at most.")
    grpo_temperature: float = _opt(1.0, "Online GRPO: sampling temperature of the rollouts.")
    grpo_top_p: float = _opt(1.0, "Online GRPO: nucleus (top-p) sampling of the rollouts.")
    extra_kwargs: dict[str, Any] = _opt(
        {}, "Extra keyword arguments for the strategy (KEY=VALUE on the command line).")

    # -- schedule of the run -------------------------------------------------------------
    n_epoch: int = _opt(1, "Passes over the dataset.")
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps (unset: all epochs).")
    batch_size: int = _opt(8, "Samples per micro-batch (per process).")
    accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    start_epoch: int = _opt(0, "Epoch a fresh run starts in (a resumed run uses its checkpoint).")
    start_batch: int = _opt(0, "Micro-batches of start_epoch a fresh run skips.")
    random_seed: int = _opt(42, "Seed of the sampler, the data loader and all RNGs.")

    # -- optimizer and learning rate -----------------------------------------------------
    learning_rate: float = _opt(3e-4, "Peak learning rate.")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only; norms and biases: 0).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.95, "AdamW beta2.")
    adam_eps: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Clip gradients to this global norm (0 disables clipping).")
    scheduler: str = _opt("cosine", "LR schedule: cosine, sgdr or constant.")
    warmup_steps: int = _opt(0, "Linear warm-up steps.")
    lr_decay_steps: int | None = _opt(
        None, "Cosine decay length after warm-up (unset: the rest of the run).")
    min_rate: float = _opt(0.1, "Floor of the schedule, as a fraction of the peak rate.")
    cycle_length: int = _opt(1000, "SGDR: steps in the first cosine cycle.")
    t_mult: int = _opt(1, "SGDR: each cycle is t_mult times longer than the previous one.")

    # -- checkpoints and logs ------------------------------------------------------------
    ckpt_dir: str = _opt("checkpoints", "Folder of checkpoints and logs.", flag="out")
    ckpt_interval: int = _opt(1000, "Save a checkpoint every this many optimizer steps.")
    keep_last: int = _opt(3, "Checkpoints to keep (older ones are deleted; 0 keeps all).")
    log_interval: int = _opt(10, "Write a metrics line every this many optimizer steps.")
    log_dir: str | None = _opt(None, "Folder of metrics.jsonl and plots (unset: OUT/logs).")
    tokenizer_dir: str | None = _opt(
        None, "Tokenizer folder copied into every checkpoint, so checkpoints are servable "
        "(with --preset it also gives the vocabulary size; default with --model: the model's).",
        flag="tokenizer")
    progress_bar: bool = _opt(True, "Show a progress bar.")

    # -- hardware ------------------------------------------------------------------------
    device_type: str = _opt("auto", "Device: auto (CUDA when available), cpu or cuda.")
    precision: str = _opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")
    compile: bool = _opt(False, "Compile the model with torch.compile.")
    num_workers: int = _opt(0, "DataLoader worker processes.")
    prefetch_factor: int = _opt(2, "Batches each worker loads ahead.")
    pin_memory: bool = _opt(False, "Pin host memory of batches (faster copies to the GPU).")

    # -- distributed (docs: packages/astrai-train/README.md, "Distributed training") -------
    nprocs: int = _opt(1, "Processes to spawn on this machine (one per GPU; under torchrun: "
                       "ignored, torchrun starts the processes).")
    parallel: str = _opt("auto", "Data parallelism across processes: auto (ddp with more than "
                         "one), none, ddp or fsdp (FSDP2: shards weights, grads, optimizer).")
    backend: str = _opt("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), "
                        "nccl or gloo.")
    master_addr: str = _opt("localhost", "Rendezvous address of process 0 (spawned runs).")
    master_port: str = _opt("auto", "Rendezvous port of process 0 (spawned runs): a number, or "
                            "auto to pick a free one.")
    dist_timeout_s: float = _opt(600.0, "Seconds a collective may wait for the other processes "
                                 "before failing (a dead or stuck rank ends the run, no hang).")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and what it accepts."""
        _check_choices(self)
        _check_ints(self)
        _check_floats(self)
        if self.grpo_online and self.strategy != "grpo":
            raise ValueError(f"TrainConfig.grpo_online (--online) is for the grpo strategy, not "
                             f"'{self.strategy}'; add --strategy grpo or drop --online")
        if str(self.master_port) != "auto" and not str(self.master_port).isdigit():
            _fail("master_port", "a port number or 'auto'", self.master_port)
        if not isinstance(self.extra_kwargs, dict):
            raise ValueError("TrainConfig.extra_kwargs must be a dict of strategy keyword arguments")

    # -- plain-value view: checkpoints, TOML files and the CLI --------------------------
    @classmethod
    def value_fields(cls) -> list[dataclasses.Field]:
        """The fields with plain values (every one has a CLI flag and a TOML key)."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.value_fields()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], **objects: Any) -> TrainConfig:
        known = {f.name for f in cls.value_fields()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}; "
                             "`astrai train --help` lists them")
        return cls(**values, **objects)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _fail(name: str, must: str, value: Any) -> None:
    raise ValueError(f"TrainConfig.{name} must be {must}, got {value!r}")


def _check_choices(cfg: TrainConfig) -> None:
    # Imported here: the registries fill up when the strategy/scheduler modules load.
    from astrai_train.schedulers import SchedulerFactory
    from astrai_train.strategies import StrategyFactory

    choices = {"strategy": StrategyFactory.list_registered(),
               "scheduler": SchedulerFactory.list_registered(),
               "dpo_reduction": DPO_REDUCTIONS, "device_type": DEVICE_TYPES,
               "precision": PRECISIONS, "backend": ("auto", "nccl", "gloo"),
               "parallel": PARALLEL_MODES}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            _fail(name, "one of " + ", ".join(allowed), getattr(cfg, name))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(cfg: TrainConfig) -> None:
    minimum = {"n_epoch": 1, "batch_size": 1, "accumulation_steps": 1, "start_epoch": 0,
               "start_batch": 0, "warmup_steps": 0, "cycle_length": 1, "t_mult": 1,
               "ckpt_interval": 1, "keep_last": 0, "log_interval": 1, "num_workers": 0,
               "prefetch_factor": 1, "nprocs": 1, "random_seed": 0, "grpo_max_new_tokens": 1}
    optional = {"max_steps": 1, "lr_decay_steps": 1, "grpo_group_size": 2}
    for name, low in {**minimum, **optional}.items():
        value = getattr(cfg, name)
        if value is None and name in optional:
            continue
        if not _is_int(value) or value < low:
            _fail(name, f"an integer >= {low}", value)
    if cfg.start_epoch >= cfg.n_epoch:
        _fail("start_epoch", f"below n_epoch ({cfg.n_epoch})", cfg.start_epoch)


def _check_floats(cfg: TrainConfig) -> None:
    # name -> (low, high, low inclusive, high inclusive)
    ranges = {"learning_rate": (0, None, False, False), "weight_decay": (0, None, True, False),
              "adam_beta1": (0, 1, True, False), "adam_beta2": (0, 1, True, False),
              "adam_eps": (0, None, False, False), "max_grad_norm": (0, None, True, False),
              "min_rate": (0, 1, True, True), "label_smoothing": (0, 1, True, False),
              "dpo_beta": (0, None, False, False), "grpo_clip_eps": (0, 1, False, False),
              "grpo_kl_coef": (0, None, True, False), "grpo_temperature": (0, None, False, False),
              "dist_timeout_s": (0, None, False, False),
              "grpo_top_p": (0, 1, False, True)}
    for name, (low, high, low_in, high_in) in ranges.items():
        value = getattr(cfg, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (value >= low if low_in else value > low)
        if high is not None:
            ok = ok and (value <= high if high_in else value < high)
        if not ok:
            bounds = f"{'[' if low_in else '('}{low}, {high if high is not None else 'inf'}"
            bounds += "]" if high_in else ")"
            _fail(name, f"a number in {bounds}", value)
