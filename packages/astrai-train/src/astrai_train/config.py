"""`TrainConfig`: everything a training run needs, typed, documented and bounded where declared.

Fields hold either plain values (numbers, strings, flags: each has an `astrai train` flag of the
same name, a TOML key of the same name, and is stored in every checkpoint) or objects a Python
caller passes in (the model, the dataset, factories; `metadata["cli"]` is False for those).
"""

# `_opt`/`_obj` return dataclasses.field(...) with help metadata; ruff cannot see through them.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import functools
import operator
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from astrai_core.deprecation import accept_renamed, rename_keys
from astrai_train.optim import OPTIMIZERS
from astrai_train.parallel.wrap import PARALLEL_MODES

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}  # accepted values, normalised
DPO_REDUCTIONS = ("mean", "sum")
BACKENDS = ("auto", "nccl", "gloo")

# Field names of the previous release -> today's (its flags and TOML keys too), so old scripts,
# TOML files and the trainer_state.json of old checkpoints keep working for one release.
RENAMED_FIELDS = {
    "random_seed": "seed", "ckpt_dir": "out", "tokenizer_dir": "tokenizer",
    "progress_bar": "progress", "device_type": "device", "precision": "dtype",
    "grpo_online": "online", "grpo_reward": "reward", "grpo_max_new_tokens": "rollout_max_tokens",
    "grpo_temperature": "rollout_temperature", "grpo_top_p": "rollout_top_p",
}
# Flags of the previous release whose name was not the field's.
RENAMED_FLAGS = {"window_size": "max_seq_len"}


def _opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None,
         choices: Sequence[str] | Callable[[], Sequence[str]] | None = None) -> Any:
    """A field with its default, its help text (shown by `astrai train --help`) and its bounds
    (pydantic's names: ge/gt/le/lt; `choices` may be a function, for registries that fill up
    when their modules load)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def _obj(help: str) -> Any:
    """A field holding a Python object: set from code, no CLI flag, not saved in checkpoints."""
    return field(default=None, metadata={"help": help, "cli": False})


def _strategies() -> list[str]:
    from astrai_train.strategies import StrategyFactory  # the registry fills up on import

    return StrategyFactory.list_registered()


def _schedules() -> list[str]:
    from astrai_train.schedulers import SchedulerFactory

    return SchedulerFactory.list_registered()


@accept_renamed(RENAMED_FIELDS)
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
    strategy: str = _opt("seq", "Training strategy: seq, sft, dpo, grpo or distill.",
                         choices=_strategies)
    label_smoothing: float = _opt(0.0, "SEQ/SFT cross-entropy label smoothing, in [0, 1).",
                                  ge=0, lt=1)
    dpo_beta: float = _opt(0.1, "DPO temperature beta on the log-ratio difference.", gt=0)
    dpo_reduction: str = _opt("mean", "DPO reduction over the pairs of a step: mean or sum.",
                              choices=DPO_REDUCTIONS)
    dpo_rpo_alpha: float = _opt(
        0.0, "Weight of the chosen replies' token NLL added to the DPO loss (TRL's rpo_alpha): "
        "keeps DPO from making good replies less likely.", ge=0)
    grpo_clip_eps: float = _opt(0.2, "GRPO ratio clip: ratios are clipped to [1-eps, 1+eps].",
                                gt=0, lt=1)
    grpo_kl_coef: float = _opt(0.04, "GRPO weight lambda of the squared log-ratio KL term.", ge=0)
    grpo_scale_rewards: bool = _opt(
        True, "GRPO advantages divided by their group's reward std (the paper's); off, they are "
        "r - mean only (Dr. GRPO), so near-unanimous groups do not get magnified advantages.")
    grpo_group_size: int | None = _opt(
        None, "GRPO responses per prompt; checked against the data (unset: taken from it). Online "
        "dpo samples this many per prompt too (unset: 4).", ge=2)
    online: bool = _opt(
        False, "Online RL (grpo, dpo): sample the responses from the live policy through "
        "astrai-serve and score them with --reward; dpo trains on each prompt's best and worst "
        "response (needs the rl extra of astrai-train; the data holds prompts only).")
    reward: str = _opt(
        "exact_answer", "Online reward: a built-in (exact_answer, format) or module:function; "
        "several, comma-separated, are averaged.")
    rollout_max_tokens: int = _opt(64, "Online RL: tokens per sampled response at most.", ge=1)
    rollout_temperature: float = _opt(1.0, "Online RL: sampling temperature of the rollouts.", gt=0)
    rollout_top_p: float = _opt(1.0, "Online RL: nucleus (top-p) sampling of the rollouts.",
                                gt=0, le=1)
    extra_kwargs: dict[str, Any] = _opt(
        {}, "Extra keyword arguments for the strategy (KEY=VALUE on the command line).")
    teacher: str | None = _opt(
        None, "distill: the teacher model folder (any size; the same tokenizer as the student).")
    distill_temperature: float = _opt(
        1.0, "distill: softmax temperature T of both distributions; the KL term is scaled by T^2.",
        gt=0)
    distill_alpha: float = _opt(
        0.0, "distill: weight of the hard-label cross entropy; the loss is (1 - alpha) * T^2 * "
        "KL(teacher || student) + alpha * CE.", ge=0, le=1)

    # -- LoRA (adapters in PEFT's format; only they train) --------------------------------
    lora_rank: int | None = _opt(
        None, "Train LoRA adapters of this rank instead of the whole model (unset: full "
        "training); checkpoints hold the adapter in PEFT's format.", ge=1)
    lora_alpha: float | None = _opt(
        None, "LoRA alpha: the update is scaled by alpha / rank (unset: 2 x rank).", gt=0)
    lora_dropout: float = _opt(0.0, "LoRA dropout on the adapters' input.", ge=0, lt=1)
    lora_targets: str = _opt(
        "all-linear", "LoRA: comma-separated layer names (q_proj,k_proj,v_proj,o_proj,gate_proj,"
        "up_proj,down_proj) or all-linear (every linear layer of the blocks).")

    # -- mixture of experts (models with n_experts > 0; astrai_train/moe.py) ---------------
    moe_bias_update_rate: float = _opt(
        1e-3, "MoE auxiliary-loss-free balancing: after every step each router's expert bias "
        "moves by this much toward the experts that took fewer tokens (DeepSeek-V3's gamma; "
        "0 turns it off). The biases steer expert choice only and travel in checkpoints.", ge=0)
    moe_aux_loss_coef: float = _opt(
        0.0, "MoE auxiliary balance loss weight alpha: alpha * E * sum_i f_i P_i (mean over "
        "MoE layers) is added to the loss; 0 turns it off.", ge=0)

    # -- schedule of the run -------------------------------------------------------------
    n_epoch: int = _opt(1, "Passes over the dataset.", ge=1)
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps (unset: all epochs).",
                                 ge=1)
    batch_size: int = _opt(8, "Samples per micro-batch (per process).", ge=1)
    accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.", ge=1)
    start_epoch: int = _opt(0, "Epoch a fresh run starts in (a resumed run uses its checkpoint).",
                            ge=0)
    start_batch: int = _opt(0, "Micro-batches of start_epoch a fresh run skips.", ge=0)
    seed: int = _opt(42, "Seed of the sampler, the data loader and all RNGs.", ge=0)

    # -- optimizer and learning rate -----------------------------------------------------
    optimizer: str = _opt("adamw", "adamw, or muon: Muon for the 2-D weights inside the blocks "
                          "and AdamW for embeddings, head, norms and biases (torch >= 2.9).",
                          choices=OPTIMIZERS)
    learning_rate: float = _opt(3e-4, "Peak learning rate.", gt=0)
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only; norms and biases: 0).",
                               ge=0)
    adam_beta1: float = _opt(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _opt(0.95, "AdamW beta2.", ge=0, lt=1)
    adam_eps: float = _opt(1e-8, "AdamW epsilon.", gt=0)
    muon_momentum: float = _opt(0.95, "Muon momentum (Nesterov).", ge=0, lt=1)
    max_grad_norm: float = _opt(1.0, "Clip gradients to this global norm (0 disables clipping).",
                                ge=0)
    scheduler: str = _opt("cosine", "LR schedule: cosine, wsd (warm-up, stable, decay), sgdr or "
                          "constant.", choices=_schedules)
    warmup_steps: int = _opt(0, "Linear warm-up steps.", ge=0)
    lr_decay_steps: int | None = _opt(
        None, "Steps the rate decays over: cosine, after warm-up (unset: the rest of the run); "
        "wsd, at the end (unset: the last 20%).", ge=1)
    min_rate: float = _opt(0.1, "Floor of the schedule, as a fraction of the peak rate.",
                           ge=0, le=1)
    cycle_length: int = _opt(1000, "SGDR: steps in the first cosine cycle.", ge=1)
    t_mult: int = _opt(1, "SGDR: each cycle is t_mult times longer than the previous one.", ge=1)

    # -- checkpoints and logs ------------------------------------------------------------
    out: str = _opt("checkpoints", "Folder of checkpoints and logs.")
    ckpt_interval: int = _opt(1000, "Save a checkpoint every this many optimizer steps.", ge=1)
    keep_last: int = _opt(3, "Checkpoints to keep (older ones are deleted; 0 keeps all).", ge=0)
    log_interval: int = _opt(10, "Write a metrics line every this many optimizer steps.", ge=1)
    log_dir: str | None = _opt(None, "Folder of metrics.jsonl and plots (unset: OUT/logs).")
    tokenizer: str | None = _opt(
        None, "Tokenizer folder copied into every checkpoint, so checkpoints are servable "
        "(with --preset it also gives the vocabulary size; default with --model: the model's).")
    progress: bool = _opt(True, "Show a progress bar.")
    eval_every: int = _opt(0, "Evaluate the model every this many optimizer steps on "
                           "--eval-tasks; the scores go to metrics.jsonl beside the loss (0: never).",
                           ge=0)
    eval_tasks: str | None = _opt(
        None, "Tasks for --eval-every, comma-separated, as `astrai eval --tasks` takes them "
        "(lm-eval names or YAML files, ppl:FILE, heldout:FOLDER).")

    # -- hardware ------------------------------------------------------------------------
    device: str = _opt("auto", "Device: auto (CUDA when available), cpu or cuda.", choices=DEVICES)
    dtype: str = _opt(
        "auto", "Compute dtype: auto (bfloat16 autocast where the device computes it natively: "
        "CUDA, or a CPU with AVX512-BF16/AMX; else float32), float32 or bfloat16.", choices=DTYPES)
    compile: bool = _opt(False, "Compile the model with torch.compile.")
    activation_checkpointing: bool = _opt(
        False, "Recompute each decoder block's activations in backward instead of keeping them: "
        "less memory, about one more forward of time.")
    fit_memory: str | None = _opt(
        None, "Fit the run to a memory budget (e.g. 6GiB, 800MiB, or auto: what the device has "
        "free): measure a step, then pick the largest micro-batch that fits and the accumulation "
        "that keeps batch_size x accumulation_steps; activation checkpointing only if needed.")
    num_workers: int = _opt(0, "DataLoader worker processes.", ge=0)
    prefetch_factor: int = _opt(2, "Batches each worker loads ahead.", ge=1)
    pin_memory: bool = _opt(False, "Pin host memory of batches (faster copies to the GPU).")

    # -- distributed (docs: packages/astrai-train/README.md, "Distributed training") -------
    nprocs: int = _opt(1, "Processes to spawn on this machine (one per GPU; under torchrun: "
                       "ignored, torchrun starts the processes).", ge=1)
    parallel: str = _opt("auto", "Data parallelism across processes: auto (ddp with more than "
                         "one), none, ddp or fsdp (FSDP2: shards weights, grads, optimizer).",
                         choices=PARALLEL_MODES)
    backend: str = _opt("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), "
                        "nccl or gloo.", choices=BACKENDS)
    master_addr: str = _opt("localhost", "Rendezvous address of process 0 (spawned runs).")
    master_port: str = _opt("auto", "Rendezvous port of process 0 (spawned runs): a number, or "
                            "auto to pick a free one.")
    dist_timeout_s: float = _opt(600.0, "Seconds a collective may wait for the other processes "
                                 "before failing (a dead or stuck rank ends the run, no hang).",
                                 gt=0)

    def __post_init__(self) -> None:
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and what it accepts."""
        hints = _type_hints()
        for f in self.value_fields():
            _check_field(f, hints[f.name], getattr(self, f.name))
        if self.start_epoch >= self.n_epoch:
            _fail("start_epoch", f"below n_epoch ({self.n_epoch})", self.start_epoch)
        if self.online and self.strategy not in ("grpo", "dpo"):
            raise ValueError(f"TrainConfig.online (--online) is for the grpo and dpo strategies, "
                             f"not '{self.strategy}'; add --strategy grpo or dpo, or drop --online")
        if self.teacher is not None and self.strategy != "distill":
            raise ValueError(f"TrainConfig.teacher (--teacher) is for --strategy distill, not "
                             f"'{self.strategy}'; add --strategy distill or drop --teacher")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError("TrainConfig.lora_alpha (--lora-alpha) needs --lora-rank R")
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            _fail("lora_targets", "comma-separated layer names or all-linear", self.lora_targets)
        if self.fit_memory is not None and self.fit_memory != "auto":
            from astrai_train.memory import parse_size

            parse_size(self.fit_memory)  # a ValueError naming the field and the accepted form
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ValueError("--optimizer muon orthogonalises whole matrices, which FSDP shards; "
                             "use --parallel ddp with muon, or --optimizer adamw with fsdp")
        if self.eval_every and not (self.eval_tasks or "").strip():
            raise ValueError("TrainConfig.eval_every (--eval-every) needs tasks: add --eval-tasks "
                             "(e.g. --eval-tasks ppl:val.jsonl,heldout:corpus/)")
        if str(self.master_port) != "auto" and not str(self.master_port).isdigit():
            _fail("master_port", "a port number or 'auto'", self.master_port)

    # -- plain-value view: checkpoints, TOML files and the CLI --------------------------
    @classmethod
    def value_fields(cls) -> list[dataclasses.Field]:
        """The fields with plain values (every one has a CLI flag and a TOML key)."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.value_fields()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], **objects: Any) -> TrainConfig:
        """Plain values (a TOML file, launch.json, a checkpoint's saved config) and objects;
        the names of the previous release are accepted."""
        values = rename_keys(values, RENAMED_FIELDS, "TrainConfig", warn=False)
        known = {f.name for f in cls.value_fields()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}; "
                             "`astrai train --help` lists them")
        return cls(**values, **objects)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _fail(name: str, must: str, value: Any) -> None:
    raise ValueError(f"TrainConfig.{name} must be {must}, got {value!r}")


def _base_type(hint: Any) -> tuple[Any, bool]:
    """int | None -> (int, True)."""
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _check_field(f: dataclasses.Field, hint: Any, value: Any) -> None:
    """Type, choices and bounds of one field, as declared with it."""
    base, optional = _base_type(hint)
    if value is None and optional:
        return
    meta = f.metadata
    if meta.get("choices") is not None:
        allowed = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        if value not in allowed:
            _fail(f.name, "one of " + ", ".join(allowed), value)
        return
    if base is int and (not isinstance(value, int) or isinstance(value, bool)):
        _fail(f.name, "an integer" + _bounds_text(meta), value)
    if base is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        _fail(f.name, "a number" + _bounds_text(meta), value)
    if base is bool and not isinstance(value, bool):
        _fail(f.name, "true or false", value)
    if base in (int, float) and not _within(meta, value):
        _fail(f.name, ("an integer" if base is int else "a number") + _bounds_text(meta), value)
    if base is dict and not isinstance(value, dict):
        _fail(f.name, "a dict of strategy keyword arguments", value)


def _within(meta: Any, value: float) -> bool:
    checks = (("ge", operator.ge), ("gt", operator.gt), ("le", operator.le), ("lt", operator.lt))
    return all(meta.get(key) is None or test(value, meta[key]) for key, test in checks)


def _bounds_text(meta: Any) -> str:
    parts = [f"{symbol} {meta[key]}" for key, symbol in
             (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if meta.get(key) is not None]
    return " " + " and ".join(parts) if parts else ""
