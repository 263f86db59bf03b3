"""`Trainer`: the training loop. One optimizer step is: take the next accumulation window of
micro-batches, forward/backward each (scaled so the window acts as one batch), then on_step_begin
(clipping), the finiteness check, the update, and on_step_end (schedule, logs, checkpoints)."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import get_total_norm

from astrai_core import Checkpoint
from astrai_train.builder import TrainContextBuilder
from astrai_train.callbacks import CallbackFactory, TrainCallback
from astrai_train.config import TrainConfig
from astrai_train.context import TrainContext
from astrai_train.parallel.wrap import all_reduce_sum, full_tensor, gradient_sync
from astrai_train.strategies.base import Batch, count_tokens


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm of a step is NaN or infinite; the step was not applied."""


def window_scales(weights: list[float], average: bool) -> list[float]:
    """Loss multipliers of the micro-batches of one window: each batch's share of the window's
    units (tokens, pairs), so the summed gradients equal those of the window as one batch."""
    total = sum(weights)
    if not average:
        return [1.0] * len(weights)
    if total <= 0:  # no unit counts at all (e.g. no assistant token): losses are 0 anyway
        return [1.0 / len(weights)] * len(weights)
    return [w / total for w in weights]


@contextmanager
def stop_on_signals(context: TrainContext) -> Iterator[None]:
    """Ctrl-C and SIGTERM ask the loop to stop after the current optimizer step (which then
    checkpoints and exits cleanly); a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def request_stop(signum: int, frame: Any) -> None:
        if context.stop_pending is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        context.stop_pending = signal.Signals(signum).name
        if context.world_size == 1:  # else all processes agree first, at the step's end
            context.stop_requested = context.stop_pending

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Trainer(config, callbacks).train(checkpoint=None) -> the final TrainContext.

    `callbacks` run after the defaults (clipping, scheduler, metric log, checkpoints, progress
    bar). `strategy_kwargs` are objects handed to the strategy, e.g. a `rollout_source`.
    """

    def __init__(self, train_config: TrainConfig, callbacks: list[TrainCallback] | None = None,
                 strategy_kwargs: dict[str, Any] | None = None) -> None:
        train_config.validate()
        self.train_config = train_config
        self.strategy_kwargs = dict(strategy_kwargs or {})
        self.callbacks = self._get_default_callbacks() + list(callbacks or [])

    def train(self, checkpoint: Checkpoint | str | Path | None = None) -> TrainContext:
        if isinstance(checkpoint, (str, Path)):
            checkpoint = Checkpoint.load(checkpoint)
        context = self._build_context(checkpoint)
        context.model.train()
        with stop_on_signals(context):
            try:
                self._emit("on_train_begin", context)
                self._run(context)
                self._emit("on_train_end", context)
            except BaseException:
                self._emit_error(context)
                raise
            finally:
                close = getattr(context.strategy, "close", None)
                if close is not None:  # e.g. online GRPO's inference engine
                    close()
        return context

    def _build_context(self, checkpoint: Checkpoint | None) -> TrainContext:
        builder = TrainContextBuilder(self.train_config).with_checkpoint(checkpoint)
        return builder.with_strategy_kwargs(**self.strategy_kwargs).build()

    def _get_default_callbacks(self) -> list[TrainCallback]:
        cfg = self.train_config
        log_dir = cfg.log_dir if cfg.log_dir is not None else Path(cfg.out) / "logs"
        callbacks = [
            CallbackFactory.create("gradient_clipping", max_grad_norm=cfg.max_grad_norm),
            CallbackFactory.create("scheduler"),
            CallbackFactory.create("metric_logger", log_dir=log_dir, save_interval=cfg.log_interval),
            CallbackFactory.create("checkpoint", save_dir=cfg.out, interval=cfg.ckpt_interval,
                                   keep_last=cfg.keep_last),
        ]
        if cfg.eval_every:  # after the checkpoint: a step's checkpoint exists before its eval
            callbacks.append(CallbackFactory.create(
                "evaluation", tasks=cfg.eval_tasks or "", every=cfg.eval_every, log_dir=log_dir,
                tokenizer=cfg.tokenizer, parallel=cfg.parallel, seed=cfg.seed))
        if cfg.progress:
            callbacks.append(CallbackFactory.create("progress_bar", num_epoch=cfg.n_epoch,
                                                    description=cfg.strategy))
        return callbacks

    # -- the loop ----------------------------------------------------------------------------
    def _run(self, ctx: TrainContext) -> None:
        cfg = ctx.config
        while ctx.epoch < cfg.n_epoch and not self._should_stop(ctx):
            ctx.sampler.set_epoch(ctx.epoch)  # keeps a restored mid-epoch position
            ctx.loader_generator.manual_seed(cfg.seed * 100_003 + ctx.epoch)
            self._emit("on_epoch_begin", ctx)
            batches = iter(ctx.dataloader)
            while not self._should_stop(ctx):
                window = list(islice(batches, cfg.accumulation_steps))
                if not window:
                    break
                self._train_step(ctx, window)  # a short last window is stepped too
            if self._should_stop(ctx):
                return
            self._emit("on_epoch_end", ctx)
            ctx.epoch += 1

    @staticmethod
    def _should_stop(ctx: TrainContext) -> bool:
        max_steps = ctx.config.max_steps
        return ctx.stop_requested is not None or (max_steps is not None and ctx.iteration >= max_steps)

    def _train_step(self, ctx: TrainContext, window: list[Any]) -> None:
        strategy = ctx.strategy
        batches = [strategy.prepare_batch(b) for b in window]
        weights = [strategy.loss_weight(b) for b in batches]
        scales = window_scales(weights, strategy.average_over_window)
        shares = window_scales(weights, average=True)  # metrics are always window means
        loss = torch.zeros((), device=ctx.device)
        ctx.step_metrics, ctx.step_tokens, samples = {}, 0, 0
        # All but the last micro-batch skip the gradient sync (DDP no_sync, FSDP2
        # set_requires_gradient_sync): gradients are reduced across ranks once per step.
        for i, (batch, scale, share) in enumerate(zip(batches, scales, shares, strict=True)):
            self._emit("on_batch_begin", ctx)
            with gradient_sync(ctx.model, enabled=i == len(batches) - 1):
                # Out of place: an fp64 model's loss promotes the fp32 zero instead of being cut.
                loss = loss + self._forward_backward(ctx, batch, scale, share)
            ctx.sampler.advance()
            ctx.step_tokens += count_tokens(batch)
            samples += len(next(iter(batch.values())))
            self._emit("on_batch_end", ctx)
        if ctx.world_size > 1:
            loss, samples = self._sync_step(ctx, loss, samples)
        ctx.samples_seen += samples  # before on_step_end, so checkpoints count this step
        self._update(ctx, loss)

    @staticmethod
    def _sync_step(ctx: TrainContext, loss: torch.Tensor, samples: int) -> tuple[torch.Tensor, int]:
        """One small all-reduce per step: the loss logged is the mean over ranks, tokens and
        samples are totals, and a stop asked of any process (Ctrl-C, SIGTERM) stops all of them
        after this same step (their checkpoint is a collective under FSDP)."""
        values = [ctx.step_tokens, samples, ctx.stop_pending is not None]
        local = torch.tensor(values, dtype=torch.float64, device=loss.device)
        summed = all_reduce_sum(torch.cat([loss.double().reshape(1), local])).tolist()
        replicas = ctx.world_size // ctx.sampler.world_size  # ranks reading the same samples (TP)
        ctx.step_tokens = round(summed[1] / replicas)
        if summed[3] > 0:
            ctx.stop_requested = ctx.stop_pending or "a signal to another process"
        mean = torch.tensor(summed[0] / ctx.world_size, dtype=loss.dtype, device=loss.device)
        return mean, round(summed[2] / replicas)

    def _forward_backward(self, ctx: TrainContext, batch: Batch, scale: float,
                          share: float) -> torch.Tensor:
        strategy = ctx.strategy
        device_batch = strategy.move_to_device(batch)
        if ctx.moe is not None:
            ctx.moe.begin_micro_batch()
        with ctx.autocast():
            loss = strategy.compute_loss(device_batch)
            aux = ctx.moe.end_micro_batch(ctx, share) if ctx.moe is not None else None
        ((loss if aux is None else loss + aux) * scale).backward()  # the logged loss is loss
        for name, value in strategy.metrics.items():
            ctx.step_metrics[name] = ctx.step_metrics.get(name, 0.0) + value.detach().float() * share
        return loss.detach().to(torch.promote_types(loss.dtype, torch.float32)) * scale

    def _update(self, ctx: TrainContext, loss: torch.Tensor) -> None:
        ctx.step_grad_norm = None
        self._emit("on_step_begin", ctx)  # clipping sets the pre-clip norm
        norm = ctx.step_grad_norm
        if norm is None:
            grads = [p.grad for p in ctx.raw_model.parameters() if p.grad is not None]
            norm = get_total_norm(grads) if grads else torch.zeros((), device=ctx.device)
        norm = full_tensor(norm)  # FSDP: the norm of sharded grads is a DTensor
        # The step's one host sync: the finiteness check needs both values, logging reuses them.
        loss_value, norm_value = torch.stack([loss, norm.to(loss)]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise self._non_finite_error(ctx, loss_value, norm_value)
        ctx.loss, ctx.grad_norm = loss_value, norm_value
        ctx.lr = float(ctx.optimizer.param_groups[0]["lr"])
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.moe is not None:  # all ranks: the expert loads are all-reduced
            ctx.moe.step(ctx)
        ctx.iteration += 1
        ctx.tokens_seen += ctx.step_tokens
        self._emit("on_step_end", ctx)

    @staticmethod
    def _non_finite_error(ctx: TrainContext, loss: float, norm: float) -> NonFiniteLossError:
        last = ctx.last_checkpoint or "none (no checkpoint was written yet)"
        return NonFiniteLossError(
            f"step {ctx.iteration + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
            f" (loss {loss}, gradient norm {norm}); the update was not applied and training "
            f"stopped. The last good checkpoint is {last}. Lower the learning rate, clip "
            "gradients (--max-grad-norm) or check the data of this step.")

    # -- callbacks ---------------------------------------------------------------------------
    def _emit(self, hook: str, ctx: TrainContext) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(ctx)

    def _emit_error(self, ctx: TrainContext) -> None:
        for callback in self.callbacks:
            with suppress(Exception):  # never hide the error that stopped training
                callback.on_error(ctx)
