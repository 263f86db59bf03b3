"""The training loop: accumulation, what is logged, clipping, non-finite steps, signals, hooks."""

from __future__ import annotations

import copy
import math
import os
import signal

import pytest
import torch
from torch.nn.utils import get_total_norm
from train_helpers import micro_model

from astrai_core import Checkpoint
from astrai_data import DatasetFactory
from astrai_train import NonFiniteLossError, TrainCallback, Trainer
from astrai_train.callbacks import HOOKS
from astrai_train.trainer import window_scales
from tolerances import adamw_drift_bound, reorder_bound


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_and_capture(config):
    """Train; return the context and, per step, the gradients before the update."""
    seen = []

    class Capture(TrainCallback):
        def on_step_begin(self, ctx):
            seen.append(_grads(ctx.raw_model))

    context = Trainer(config, callbacks=[Capture()]).train()
    return context, seen


@pytest.mark.parametrize("kind", ["seq", "sft"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulating_four_batches_of_two_equals_one_batch_of_eight(kind, optimizer,
                                                                    make_config, request, tmp_path):
    """In float64, so the bounds derive from its epsilon (train_helpers): the gradients of the
    window (8 samples x 16 tokens through 2 blocks of width <= 64) agree to the reordering bound
    of their sums; SGD moves weights by lr times that, AdamW by at most lr / eps times it."""
    dataset = DatasetFactory.load(kind, request.getfixturevalue(f"{kind}_file"), window_size=16)
    lr = 0.1 if optimizer == "sgd" else 1e-3
    optimizer_fn = (lambda p: torch.optim.SGD(p, lr=lr)) if optimizer == "sgd" else None
    grad_error = reorder_bound(8 * 16 * 64 * 2)
    atol = 2 * lr * grad_error if optimizer == "sgd" else adamw_drift_bound(2, lr, grad_error)
    runs = {}
    for batch_size, accumulation in ((2, 4), (8, 1)):
        config = make_config(model=micro_model().double(), dataset=dataset, strategy=kind,
                             max_steps=2, learning_rate=lr,
                             batch_size=batch_size, accumulation_steps=accumulation,
                             max_grad_norm=0.0, optimizer_fn=optimizer_fn,
                             out=str(tmp_path / f"out-{batch_size}"))
        runs[batch_size] = _run_and_capture(config)
    (small, small_grads), (big, big_grads) = runs[2], runs[8]
    # The logged window mean: 128 token losses, each a 64-way logsumexp of logits below 10.
    assert small.loss == pytest.approx(big.loss, abs=reorder_bound(128 * 64, scale=10.0))
    for g_small, g_big in zip(small_grads, big_grads, strict=True):
        for name in g_big:
            torch.testing.assert_close(g_small[name], g_big[name], atol=grad_error, rtol=0)
    big_state = big.raw_model.state_dict()
    for name, tensor in small.raw_model.state_dict().items():
        torch.testing.assert_close(tensor, big_state[name], atol=atol, rtol=0, msg=name)


def test_a_short_last_window_is_stepped_too(make_config, seq_dataset):
    # 10 batches per epoch with windows of 4: steps of 4, 4 and 2 micro-batches.
    dataset = torch.utils.data.Subset(seq_dataset, range(20))
    config = make_config(model=micro_model(), dataset=dataset, accumulation_steps=4)
    micro = []
    context = Trainer(config, callbacks=[_Hooks(micro)]).train()
    assert context.iteration == 3 and context.sampler.iter == 10
    steps = " ".join(micro).split("on_step_begin")
    assert [s.count("on_batch_end") for s in steps[:3]] == [4, 4, 2]


def test_window_scales_weight_micro_batches_by_their_units():
    assert window_scales([30.0, 10.0], average=True) == [0.75, 0.25]
    assert window_scales([0.0, 0.0], average=True) == [0.5, 0.5]  # nothing to count: plain mean
    assert window_scales([3.0, 5.0], average=False) == [1.0, 1.0]  # summed losses add up


class _Hooks(TrainCallback):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __getattribute__(self, name: str):
        if name in HOOKS:
            return lambda ctx: object.__getattribute__(self, "log").append(name)
        return object.__getattribute__(self, name)


def test_hooks_run_in_the_documented_order(make_config, seq_dataset):
    dataset = torch.utils.data.Subset(seq_dataset, range(8))  # 4 batches: 2 steps of 2
    log: list[str] = []
    Trainer(make_config(model=micro_model(), dataset=dataset, accumulation_steps=2),
            callbacks=[_Hooks(log)]).train()
    step = ["on_batch_begin", "on_batch_end"] * 2 + ["on_step_begin", "on_step_end"]
    assert log == ["on_train_begin", "on_epoch_begin", *step, *step, "on_epoch_end", "on_train_end"]


def test_logged_loss_is_the_window_mean_and_grad_norm_is_before_clipping(make_config, seq_dataset):
    model = micro_model().double()  # float64: the tolerances below derive from its epsilon
    start = copy.deepcopy(model)
    config = make_config(model=model, dataset=seq_dataset, accumulation_steps=3, max_steps=1,
                         max_grad_norm=1e-3)
    batches, clipped = [], []

    class Spy(TrainCallback):
        def on_batch_begin(self, ctx):
            batches.append(None)

        def on_step_begin(self, ctx):  # runs after clipping (defaults come first)
            clipped.append(get_total_norm([p.grad for p in ctx.raw_model.parameters()]).item())

    context = Trainer(config, callbacks=[Spy()]).train()
    # Replay the window on the starting weights, independently of the trainer.
    sampler = type(context.sampler)(len(seq_dataset), 2, seed=0)
    order = sampler.epoch_indices(0)[:6]
    losses = []
    for i in range(3):
        batch = seq_dataset.collate_fn([seq_dataset[j] for j in order[2 * i:2 * i + 2]])
        logits = start(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        (loss / 3).backward()
        losses.append(loss.item())
    norm = get_total_norm([p.grad for p in start.parameters()]).item()
    # The trainer's fused chunked cross entropy and this plain one sum the same 96 token
    # losses (64-way logsumexps of logits below 10) and their gradients in another order.
    assert context.loss == pytest.approx(sum(losses) / 3, abs=reorder_bound(96 * 64, scale=10.0))
    assert context.grad_norm == pytest.approx(norm, rel=reorder_bound(96 * 64 * 2) * 200 / 1e-2)
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6), its own epsilon.
    assert norm > 1e-2 and clipped[0] == pytest.approx(1e-3 * norm / (norm + 1e-6), rel=1e-9)


def test_checkpoint_after_step_n_holds_the_weights_after_n_updates(make_config, seq_dataset, tmp_path):
    weights = {}

    class Snapshot(TrainCallback):
        def on_step_end(self, ctx):
            weights[ctx.iteration] = {k: v.clone() for k, v in ctx.raw_model.state_dict().items()}

    config = make_config(model=micro_model(), dataset=seq_dataset, max_steps=4, ckpt_interval=2,
                         keep_last=0, scheduler="cosine", warmup_steps=1)
    Trainer(config, callbacks=[Snapshot()]).train()
    for step in (2, 4):
        ckpt = Checkpoint.load(tmp_path / "out" / f"step_{step:08d}")
        assert ckpt.iteration == step
        for name, tensor in weights[step].items():
            assert torch.equal(ckpt.state_dict[name], tensor), (step, name)
        assert ckpt.states["scheduler"]["last_epoch"] == step
        assert ckpt.states["sampler"]["iter"] == step  # one batch per step


def test_a_non_finite_step_names_the_step_and_keeps_the_last_good_checkpoint(
        make_config, seq_dataset, tmp_path):
    class Poison(TrainCallback):
        def on_batch_end(self, ctx):  # after backward, before clipping measures the norm
            if ctx.iteration == 4:  # step 5: poison a gradient
                next(ctx.raw_model.parameters()).grad[0, 0] = float("nan")

    model = micro_model()
    config = make_config(model=model, dataset=seq_dataset, max_steps=8, ckpt_interval=3)
    trainer = Trainer(config, callbacks=[Poison()])
    good = tmp_path / "out" / "step_00000003"
    seen = {}

    class Before(TrainCallback):
        def on_step_end(self, ctx):
            if ctx.iteration == 4:
                seen.update({k: v.clone() for k, v in ctx.raw_model.state_dict().items()})
                seen["files"] = {p.name: p.read_bytes() for p in good.iterdir()}

    trainer.callbacks.append(Before())
    with pytest.raises(NonFiniteLossError, match=r"step 5: non-finite gradient.*step_00000003"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("step")) == [
        "step_00000003"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == seen["files"]
    for name, tensor in model.state_dict().items():  # the bad update was not applied
        assert torch.equal(tensor, seen[name]), name


def test_a_non_finite_loss_is_caught_too(make_config, seq_dataset):
    model = micro_model()
    with torch.no_grad():
        model.norm.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"step 1: non-finite loss"):
        Trainer(make_config(model=model, dataset=seq_dataset, max_steps=2)).train()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint(sig, make_config, seq_dataset, tmp_path):
    class Send(TrainCallback):
        sent = False

        def on_batch_end(self, ctx):
            if ctx.iteration == 2 and not self.sent:  # in the middle of step 3's window
                self.sent = True
                os.kill(os.getpid(), sig)

    config = make_config(model=micro_model(), dataset=seq_dataset, accumulation_steps=2,
                         max_steps=10, ckpt_interval=100)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    context = Trainer(config, callbacks=[Send()]).train()
    assert context.stop_requested == sig.name and context.iteration == 3
    assert context.last_checkpoint == tmp_path / "out" / "step_00000003"
    assert Checkpoint.load(context.last_checkpoint).states["sampler"]["iter"] == 6
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_missing_objects_and_devices_are_explained(make_config, seq_dataset):
    with pytest.raises(ValueError, match="TrainConfig.model is not set"):
        Trainer(make_config(dataset=seq_dataset)).train()
    with pytest.raises(ValueError, match="TrainConfig.dataset is not set"):
        Trainer(make_config(model=micro_model())).train()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device is 'cuda' but CUDA is not available"):
            Trainer(make_config(model=micro_model(), dataset=seq_dataset, device="cuda")).train()
    with pytest.raises(ValueError, match="start_batch=500 is not below"):
        Trainer(make_config(model=micro_model(), dataset=seq_dataset, start_batch=500)).train()
    with pytest.raises(ValueError, match="the 'seq' strategy takes no beta; it takes label_smoothing"):
        Trainer(make_config(model=micro_model(), dataset=seq_dataset,
                            extra_kwargs={"beta": 0.1})).train()
    with pytest.raises(ValueError, match="do not fill one batch"):
        Trainer(make_config(model=micro_model(), dataset=torch.utils.data.Subset(seq_dataset, [0]))).train()


def test_dpo_and_grpo_train_end_to_end_and_log_their_metrics(make_config, dpo_file, grpo_file):
    for kind, path, keys in (("dpo", dpo_file, {"reward_accuracy", "reward_margin"}),
                             ("grpo", grpo_file, {"reward_std", "zero_std_fraction", "clip_fraction", "kl"})):
        dataset = DatasetFactory.load(kind, path)
        config = make_config(model=micro_model(), dataset=dataset, strategy=kind, max_steps=2,
                             accumulation_steps=2, out=str(path.parent / f"out-{kind}"))
        context = Trainer(config).train()
        assert context.iteration == 2 and keys <= set(context.step_metrics)
        ref = context.strategy.ref_model
        assert not ref.training and not torch.equal(ref.lm_head.weight, context.raw_model.lm_head.weight)


def test_bf16_autocast_can_be_asked_for_on_cpu(make_config, seq_dataset):
    seen = []

    class Dtype(TrainCallback):
        def on_batch_begin(self, ctx):
            with ctx.autocast():
                seen.append(ctx.model(torch.zeros(1, 4, dtype=torch.long)).dtype)

    context = Trainer(make_config(model=micro_model(), dataset=seq_dataset, max_steps=2,
                                  dtype="bfloat16"), callbacks=[Dtype()]).train()
    assert seen[0] == torch.bfloat16 and math.isfinite(context.loss)
    assert next(context.raw_model.parameters()).dtype == torch.float32  # master weights stay fp32


@pytest.mark.gpu
def test_cuda_trains_under_bf16_autocast_by_default(make_config, seq_dataset):
    context = Trainer(make_config(model=micro_model(), dataset=seq_dataset, max_steps=3,
                                  device="cuda")).train()
    assert context.autocast_dtype == torch.bfloat16 and context.device.type == "cuda"
    assert math.isfinite(context.loss) and context.iteration == 3
