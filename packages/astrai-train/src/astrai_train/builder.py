"""`TrainContextBuilder`: builds the `TrainContext` of a run from a `TrainConfig` and optionally a
checkpoint, through small `build_*` functions (device, strategy, wrapped model, sampler, data
loader, optimizer, schedule), restoring the checkpoint's training state last."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset

from astrai_core import Checkpoint
from astrai_core.capability import compute_dtype
from astrai_data import ResumableDistributedSampler, collate_fn_for
from astrai_train.config import TrainConfig
from astrai_train.context import TrainContext
from astrai_train.moe import build_balancer
from astrai_train.optim import build_optimizer
from astrai_train.parallel import (
    get_current_device,
    get_rank,
    get_world_size,
    resolve_parallel,
    wrap_parallel,
)
from astrai_train.recipes import add_lora, add_teacher, fit_to_memory, set_activation_checkpointing
from astrai_train.resume import load_model_state, reference_checksum, restore_training_state
from astrai_train.rng import seed_everything, seed_worker
from astrai_train.schedulers import SchedulerFactory
from astrai_train.strategies import BaseStrategy, StrategyFactory

ROLLOUT_MAX_CONCURRENT = 256  # online RL: sequences the rollout engine decodes at once, at most

# TrainConfig field -> strategy keyword, per strategy.
STRATEGY_FIELDS: dict[str, dict[str, str]] = {
    "seq": {"label_smoothing": "label_smoothing"},
    "sft": {"label_smoothing": "label_smoothing"},
    "dpo": {"beta": "dpo_beta", "reduction": "dpo_reduction", "rpo_alpha": "dpo_rpo_alpha"},
    "grpo": {"clip_eps": "grpo_clip_eps", "kl_coef": "grpo_kl_coef",
             "group_size": "grpo_group_size", "scale_rewards": "grpo_scale_rewards"},
    "distill": {"temperature": "distill_temperature", "alpha": "distill_alpha"},
}


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
        seed_everything(cfg.seed)  # a resumed run restores the saved states at the end
        device = resolve_device(cfg.device)
        rank, world_size = get_rank(), get_world_size()
        model = cfg.model.to(device)
        add_lora(cfg, model)  # before the strategy: a LoRA policy's reference is its base
        set_activation_checkpointing(model, cfg.activation_checkpointing)
        # The reference is the policy as given, before checkpoint weights load into it.
        objects = dict(self._strategy_kwargs)
        if cfg.online and getattr(cfg.dataset, "online", True) is False:
            raise ValueError("--online samples responses to a prompts-only GRPO file, but this "
                             "file holds scored groups (offline GRPO); drop --online, or prepare "
                             "prompts with `astrai data prepare --strategy grpo` from prompt records")
        if cfg.online and "rollout_source" not in objects:
            objects["rollout_source"] = build_rollout_source(cfg)
        add_teacher(cfg, objects)
        strategy = build_strategy(cfg, model, device, **objects)
        checksum = reference_checksum(strategy)
        if self._checkpoint is not None:
            load_model_state(model, self._checkpoint)
        autocast = autocast_dtype(device, cfg.dtype)
        cfg = fit_to_memory(cfg, strategy, model, device, collate_for(cfg, cfg.dataset), autocast,
                            self._checkpoint)
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
            autocast_dtype=autocast, reference_checksum=checksum,
            rank=rank, world_size=world_size, moe=build_balancer(cfg, model))
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
    """Online GRPO's and DPO's sampler: the engine of astrai-serve (the `rl` extra) on the live
    policy. No log-probs of the sampling policy: each rollout gets exactly one update (under
    gradient accumulation too, as no update falls between a window's rollouts), so the
    sampling policy is the one being trained; GRPO's ratio takes it detached."""
    from astrai_train.rl import EngineRolloutSource, RolloutConfig, build_reward, require_serve
    from astrai_train.rl.rollout import DEFAULT_GROUP_SIZE

    require_serve()  # the missing extra first: its hint is the fix, whatever else is wrong
    if cfg.tokenizer is None:
        raise ValueError("online RL needs the tokenizer to decode and score responses: pass "
                         "--tokenizer DIR, or a --model folder that holds tokenizer files")
    from astrai_core import AutoTokenizer

    group = cfg.grpo_group_size or DEFAULT_GROUP_SIZE
    # A step's rollouts decode together (up to 256): one wave of decode steps, not several
    # (the quickstart's 32 x 4: 128 at once instead of two waves of 64)
    concurrent = min(ROLLOUT_MAX_CONCURRENT, max(64, cfg.batch_size * group))
    rollout = RolloutConfig(group_size=group, max_new_tokens=cfg.rollout_max_tokens,
                            temperature=cfg.rollout_temperature, top_p=cfg.rollout_top_p,
                            seed=cfg.seed, old_log_probs=False, max_batch_size=concurrent)
    reward = build_reward(cfg.reward)  # comma-separated names are averaged
    return EngineRolloutSource(AutoTokenizer.from_pretrained(cfg.tokenizer), reward, rollout)


def resolve_device(device: str) -> torch.device:
    """The device of this process: under torch.distributed, its LOCAL_RANK's GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("TrainConfig.device is 'cuda' but CUDA is not available; "
                         "use --device cpu or --device auto")
    resolved = get_current_device(device)
    if resolved.type == "cuda" and not torch.distributed.is_initialized():
        return torch.device("cuda")  # the current device, as before
    return resolved


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """bf16 autocast where asked, or under 'auto' where the device computes bf16 natively (CUDA,
    CPUs with AVX512-BF16/AMX: astrai_core.capability); else fp32, without autocast."""
    if dtype == "bfloat16" or (dtype == "auto" and compute_dtype(device) == torch.bfloat16):
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
                                          world_size=world_size, seed=cfg.seed,
                                          shuffle=True, drop_last=True)
    if cfg.start_batch >= sampler.batches_per_epoch:
        raise ValueError(f"TrainConfig.start_batch={cfg.start_batch} is not below the "
                         f"{sampler.batches_per_epoch} batches of an epoch")
    return sampler


def collate_for(cfg: TrainConfig, dataset: Dataset) -> Callable[..., Any]:
    """The dataset's own collate function, else the one of the data the strategy reads
    (distill: windows; online: prompt lists)."""
    kind = "grpo" if cfg.online else "seq" if cfg.strategy == "distill" else cfg.strategy
    return getattr(dataset, "collate_fn", None) or collate_fn_for(kind)


def build_dataloader(cfg: TrainConfig, dataset: Dataset, sampler: ResumableDistributedSampler,
                     generator: torch.Generator, device: torch.device) -> DataLoader:
    collate = collate_for(cfg, dataset)
    workers = cfg.num_workers
    return DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
        num_workers=workers, prefetch_factor=cfg.prefetch_factor if workers else None,
        pin_memory=cfg.pin_memory and device.type == "cuda", worker_init_fn=seed_worker,
        # A private generator, reseeded every epoch: creating an iterator never draws from the
        # global RNG, so a resumed run sees the same random stream as an uninterrupted one.
        generator=generator, persistent_workers=False)


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
    schedule = SchedulerFactory._registry.get(cfg.scheduler)
    accepted = inspect.signature(schedule).parameters
    # A schedule that knows the run's length picks its own default decay (wsd: the last 20%);
    # the others decay over the rest of the run after warm-up.
    decay = cfg.lr_decay_steps
    if decay is None and "total_steps" not in accepted:
        decay = max(total_steps - cfg.warmup_steps, 1)
    values = {"warmup_steps": cfg.warmup_steps, "min_rate": cfg.min_rate, "lr_decay_steps": decay,
              "total_steps": total_steps, "cycle_length": cfg.cycle_length, "t_mult": cfg.t_mult}
    # Pass each schedule the fields its constructor takes (user-registered ones too).
    kwargs = {k: v for k, v in values.items() if k in accepted}
    return SchedulerFactory.create(optimizer, cfg.scheduler, **kwargs)
