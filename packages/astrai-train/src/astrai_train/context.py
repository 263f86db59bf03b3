"""`TrainContext` (the state of a run that callbacks see) and `TrainContextBuilder`, which builds
it from a `TrainConfig` and optionally a checkpoint through small `build_*` functions."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset

from astrai_core import Checkpoint
from astrai_data import ResumableDistributedSampler, collate_fn_for
from astrai_train.config import TrainConfig
from astrai_train.parallel import (
    full_model_state_dict,
    get_current_device,
    get_rank,
    get_world_size,
    is_fsdp,
    resolve_parallel,
    wrap_parallel,
)
from astrai_train.resume import load_model_state, reference_checksum, restore_training_state
from astrai_train.rng import seed_everything, seed_worker
from astrai_train.schedulers import SchedulerFactory
from astrai_train.strategies import BaseStrategy, StrategyFactory

# TrainConfig field -> strategy keyword, per train type.
STRATEGY_FIELDS: dict[str, dict[str, str]] = {
    "seq": {"label_smoothing": "label_smoothing"},
    "sft": {"label_smoothing": "label_smoothing"},
    "dpo": {"beta": "dpo_beta", "reduction": "dpo_reduction"},
    "grpo": {"clip_eps": "grpo_clip_eps", "kl_coef": "grpo_kl_coef",
             "group_size": "grpo_group_size"},
}


@dataclass
class TrainContext:
    """Everything about a run in progress. `iteration` counts optimizer updates; `loss`,
    `grad_norm` and `lr` describe the last one (the mean loss over its accumulation window, the
    gradient norm before clipping, the rate it used)."""

    config: TrainConfig
    model: nn.Module  # the module that runs forward (compiled / wrapped when asked)
    strategy: BaseStrategy
    dataloader: DataLoader
    sampler: ResumableDistributedSampler
    optimizer: Optimizer
    scheduler: LRScheduler | None
    device: torch.device
    total_steps: int
    loader_generator: torch.Generator
    raw_model: nn.Module  # the plain model: state dicts and checkpoints
    checkpoint: Checkpoint | None = None
    epoch: int = 0
    iteration: int = 0
    loss: float = math.nan
    grad_norm: float = math.nan
    lr: float = 0.0
    world_size: int = 1
    rank: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    step_tokens: int = 0  # real tokens in the last optimizer step
    step_grad_norm: torch.Tensor | None = None  # set before the update (pre-clip), then synced
    step_metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # window means, unsynced
    autocast_dtype: torch.dtype | None = None
    reference_checksum: float | None = None
    stop_requested: str | None = None  # name of the signal that asked the run to stop
    stop_pending: str | None = None  # a signal seen here, not yet agreed by all processes
    last_checkpoint: Path | None = None

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights (gathered under FSDP: a collective, every rank calls it; only rank
        0 gets them). A `state_dict_fn` is called on every rank too (e.g. a TP gather)."""
        fn = self.config.state_dict_fn
        if fn is not None:
            return fn(self.raw_model)
        if is_fsdp(self.raw_model):
            return full_model_state_dict(self.raw_model)
        return self.raw_model.state_dict()

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


class TrainContextBuilder:
    """TrainContextBuilder(config).with_checkpoint(ckpt).build() -> TrainContext."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self._checkpoint: Checkpoint | None = None
        self._strategy_kwargs: dict[str, Any] = {}

    def with_checkpoint(self, checkpoint: Checkpoint | None) -> Self:
        self._checkpoint = checkpoint
        return self

    def with_strategy_kwargs(self, **kwargs: Any) -> Self:
        """Objects for the strategy that are not config values (a rollout source, a ref model)."""
        self._strategy_kwargs.update(kwargs)
        return self

    def build(self) -> TrainContext:
        cfg = self.config
        require_objects(cfg)
        seed_everything(cfg.random_seed)  # a resumed run restores the saved states at the end
        device = resolve_device(cfg.device_type)
        rank, world_size = get_rank(), get_world_size()
        model = cfg.model.to(device)
        # The reference is the policy as given, before checkpoint weights load into it.
        objects = dict(self._strategy_kwargs)
        if cfg.grpo_online and getattr(cfg.dataset, "online", True) is False:
            raise ValueError("--online samples responses to a prompts-only GRPO file, but this "
                             "file holds scored groups (offline GRPO); drop --online, or prepare "
                             "prompts with `astrai data prepare --kind grpo` from prompt records")
        if cfg.grpo_online and "rollout_source" not in objects:
            objects["rollout_source"] = build_rollout_source(cfg)
        strategy = build_strategy(cfg, model, device, **objects)
        checksum = reference_checksum(strategy)
        if self._checkpoint is not None:
            load_model_state(model, self._checkpoint)
        strategy.model = wrap_model(cfg, model, device)
        # Data-parallel ranks read different samples; without data parallelism (one process,
        # or tensor parallelism with parallel="none") every rank reads the same ones.
        data_parallel = cfg.parallel_wrapper is not None or resolve_parallel(
            cfg.parallel, world_size) != "none"
        sampler = build_sampler(cfg, cfg.dataset, *((rank, world_size) if data_parallel else (0, 1)))
        generator = torch.Generator()
        optimizer = build_optimizer(cfg, model)
        total_steps = count_total_steps(cfg, sampler)
        ctx = TrainContext(
            config=cfg, model=strategy.model, strategy=strategy,
            dataloader=build_dataloader(cfg, cfg.dataset, sampler, generator, device),
            sampler=sampler, optimizer=optimizer, total_steps=total_steps,
            scheduler=build_scheduler(cfg, optimizer, total_steps), device=device,
            loader_generator=generator, raw_model=model, checkpoint=self._checkpoint,
            autocast_dtype=autocast_dtype(device, cfg.precision), reference_checksum=checksum,
            rank=rank, world_size=world_size)
        if self._checkpoint is not None:
            restore_training_state(ctx, self._checkpoint)  # RNG states last
        else:
            ctx.epoch = cfg.start_epoch
            sampler.set_epoch(cfg.start_epoch)
            sampler.advance(cfg.start_batch)
        return ctx


def require_objects(cfg: TrainConfig) -> None:
    if not isinstance(cfg.model, nn.Module):
        raise ValueError("TrainConfig.model is not set: pass the nn.Module to train")
    if cfg.dataset is None or not hasattr(cfg.dataset, "__len__"):
        raise ValueError("TrainConfig.dataset is not set: pass a map-style dataset "
                         "(e.g. astrai_data.DatasetFactory.load(...))")


def build_rollout_source(cfg: TrainConfig) -> Any:
    """Online GRPO's sampler: the engine of astrai-serve (the `rl` extra) on the live policy."""
    from astrai_train.rl import EngineRolloutSource, RolloutConfig, build_reward, require_serve
    from astrai_train.rl.rollout import DEFAULT_GROUP_SIZE

    require_serve()  # the missing extra first: its hint is the fix, whatever else is wrong
    if cfg.tokenizer_dir is None:
        raise ValueError("online GRPO needs the tokenizer to decode and score responses: pass "
                         "--tokenizer DIR, or a --model folder that holds tokenizer files")
    from astrai_core import AutoTokenizer

    rollout = RolloutConfig(group_size=cfg.grpo_group_size or DEFAULT_GROUP_SIZE,
                            max_new_tokens=cfg.grpo_max_new_tokens,
                            temperature=cfg.grpo_temperature, top_p=cfg.grpo_top_p,
                            seed=cfg.random_seed)
    reward = build_reward(cfg.grpo_reward)  # comma-separated names are averaged
    return EngineRolloutSource(AutoTokenizer.from_pretrained(cfg.tokenizer_dir), reward, rollout)


def resolve_device(device_type: str) -> torch.device:
    """The device of this process: under torch.distributed, its LOCAL_RANK's GPU."""
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device_type is 'cuda' but CUDA is not available; "
                         "use device_type='cpu' (--device-type cpu) or 'auto'")
    device = get_current_device(device_type)
    if device.type == "cuda" and not torch.distributed.is_initialized():
        return torch.device("cuda")  # the current device, as before
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast on CUDA under 'auto'; fp32 (no autocast) on CPU, where bf16 is slow."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_strategy(cfg: TrainConfig, model: nn.Module, device: torch.device,
                   **objects: Any) -> BaseStrategy:
    kwargs = {kw: getattr(cfg, name) for kw, name in STRATEGY_FIELDS.get(cfg.strategy, {}).items()}
    kwargs.update(cfg.extra_kwargs)
    kwargs.update(objects)
    strategy_cls = StrategyFactory._registry.get(cfg.strategy)
    accepted = set(inspect.signature(strategy_cls).parameters) - {"model", "device"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"TrainConfig.extra_kwargs: the '{cfg.strategy}' strategy takes no "
                         f"{', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")
    strategy = StrategyFactory.create(model, cfg.strategy, device, **kwargs)
    for ref in strategy.reference_models():
        ref.to(device)
    return strategy


def wrap_model(cfg: TrainConfig, model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """The module that runs forward: wrapped for data parallelism (`parallel_wrapper` when
    given, else `parallel`: DDP/FSDP2), optionally compiled."""
    if cfg.parallel_wrapper is not None:
        wrapped = cfg.parallel_wrapper(model)
    else:
        mode = resolve_parallel(cfg.parallel, get_world_size())
        wrapped = wrap_parallel(model, mode, device or next(model.parameters()).device)
    if cfg.compile:
        wrapped.compile()  # in place: parameter names and state_dict keys stay the same
    return wrapped


def build_sampler(cfg: TrainConfig, dataset: Dataset, rank: int = 0,
                  world_size: int = 1) -> ResumableDistributedSampler:
    """Each rank reads its own shard: rank r takes every world_size-th index of the shuffled
    order, so one step of N ranks covers the samples of one batch of N x batch_size."""
    sampler = ResumableDistributedSampler(len(dataset), cfg.batch_size, rank=rank,
                                          world_size=world_size, seed=cfg.random_seed,
                                          shuffle=True, drop_last=True)
    if cfg.start_batch >= sampler.batches_per_epoch:
        raise ValueError(f"TrainConfig.start_batch={cfg.start_batch} is not below the "
                         f"{sampler.batches_per_epoch} batches of an epoch")
    return sampler


def build_dataloader(cfg: TrainConfig, dataset: Dataset, sampler: ResumableDistributedSampler,
                     generator: torch.Generator, device: torch.device) -> DataLoader:
    collate: Callable[..., Any] = getattr(dataset, "collate_fn", None) or collate_fn_for(cfg.strategy)
    workers = cfg.num_workers
    return DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
        num_workers=workers, prefetch_factor=cfg.prefetch_factor if workers else None,
        pin_memory=cfg.pin_memory and device.type == "cuda", worker_init_fn=seed_worker,
        # A private generator, reseeded every epoch: creating an iterator never draws from the
        # global RNG, so a resumed run sees the same random stream as an uninterrupted one.
        generator=generator, persistent_workers=False)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer_fn is not None:
        return cfg.optimizer_fn([p for _, p in params])
    # Decay matrices only: decaying norm gains and biases toward 0 hurts and saves nothing.
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=fused_adamw_supported(params))


def fused_adamw_supported(params: list[tuple[str, nn.Parameter]]) -> bool:
    """The fused AdamW kernel (one pass over all parameters) runs on CPU and CUDA fp tensors."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                for _, p in params)


def count_total_steps(cfg: TrainConfig, sampler: ResumableDistributedSampler) -> int:
    """Optimizer steps of the whole run (a partial last window of an epoch is a step too)."""
    per_epoch = sampler.batches_per_epoch
    acc = cfg.accumulation_steps
    total = math.ceil((per_epoch - cfg.start_batch) / acc)
    total += (cfg.n_epoch - cfg.start_epoch - 1) * math.ceil(per_epoch / acc)
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


def build_scheduler(cfg: TrainConfig, optimizer: Optimizer, total_steps: int) -> LRScheduler | None:
    if cfg.scheduler_fn is not None:
        return cfg.scheduler_fn(optimizer)
    values = {"warmup_steps": cfg.warmup_steps, "min_rate": cfg.min_rate,
              "lr_decay_steps": cfg.lr_decay_steps or max(total_steps - cfg.warmup_steps, 1),
              "cycle_length": cfg.cycle_length, "t_mult": cfg.t_mult}
    # Pass each schedule the fields its constructor takes (user-registered ones too).
    accepted = inspect.signature(SchedulerFactory._registry.get(cfg.scheduler)).parameters
    kwargs = {k: v for k, v in values.items() if k in accepted}
    return SchedulerFactory.create(optimizer, cfg.scheduler, **kwargs)
