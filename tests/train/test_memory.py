"""Memory: activation checkpointing keeps the gradients and saves what autograd keeps for
backward; `--fit-memory` parses sizes, chooses micro-batches from measured peaks, and on CPU
picks a smaller micro-batch whose accumulated step equals the requested batch's."""

from __future__ import annotations

import re

import pytest
import torch
from train_helpers import micro_model
from typer.testing import CliRunner

from astrai_core.cli.main import app
from astrai_data import DatasetFactory
from astrai_train import TrainCallback, Trainer
from astrai_train.memory import MARGIN, choose_micro_batch, cpu_peak_bytes, parse_size
from tolerances import adamw_drift_bound, reorder_bound

MiB = 1 << 20


@pytest.mark.parametrize(("text", "size"), [
    ("6GiB", 6 << 30), ("6G", 6 << 30), ("6GB", 6 * 10**9), ("800MiB", 800 << 20),
    ("1.5 GiB", 3 << 29), ("512k", 512 << 10), ("4096", 4096), ("2 MB", 2_000_000),
])
def test_sizes_parse_as_binary_unless_spelled_decimal(text, size):
    assert parse_size(text) == size


def test_a_bad_size_or_option_is_refused_by_name(make_config):
    with pytest.raises(ValueError, match="fit_memory must be a size such as 6GiB"):
        parse_size("lots")
    with pytest.raises(ValueError, match="fit_memory must be a size"):
        make_config(fit_memory="6 gigs")
    assert make_config(fit_memory="auto").fit_memory == "auto"


# -- choosing, on measurements given ------------------------------------------------------------

def linear(fixed: int, per_sample: int, checkpointed_per_sample: int | None = None):
    calls = []

    def measure(m: int, ckpt: bool) -> int:
        calls.append((m, ckpt))
        return fixed + m * (checkpointed_per_sample if ckpt else per_sample)

    return measure, calls


def test_the_largest_divisor_that_fits_wins_and_keeps_the_global_batch():
    measure, calls = linear(100 * MiB, 10 * MiB)
    # limit = 0.9 * budget = 145 MiB: 4 samples (140) fit, 8 (180) do not.
    fit = choose_micro_batch(measure, 8, int(145 * MiB / (1 - MARGIN)))
    assert (fit.micro_batch, fit.accumulation, fit.activation_checkpointing) == (4, 2, False)
    assert fit.predicted == 140 * MiB
    assert calls == [(1, False), (2, False), (4, False)]  # 4 was confirmed by measuring it
    assert "chose micro-batch 4 x 2 accumulation, activation checkpointing off" in fit.describe()
    whole = choose_micro_batch(measure, 12, 10**12)
    assert (whole.micro_batch, whole.accumulation) == (12, 1)
    odd = choose_micro_batch(linear(100 * MiB, 10 * MiB)[0], 7, int(145 * MiB / (1 - MARGIN)))
    assert (odd.micro_batch, odd.accumulation) == (1, 7)  # 7 = 1 x 7: nothing between


def test_a_confirming_measurement_above_the_prediction_steps_down():
    def measure(m: int, ckpt: bool) -> int:  # superlinear past 2 samples
        return 100 * MiB + m * 10 * MiB + (50 * MiB if m > 2 else 0)

    fit = choose_micro_batch(measure, 8, int(145 * MiB / (1 - MARGIN)))
    assert (fit.micro_batch, fit.accumulation) == (2, 4)


def test_checkpointing_is_turned_on_only_when_one_sample_does_not_fit_without_it():
    measure, calls = linear(100 * MiB, 60 * MiB, checkpointed_per_sample=15 * MiB)
    fit = choose_micro_batch(measure, 8, int(150 * MiB / (1 - MARGIN)))  # 1 sample: 160 > 150
    assert fit.activation_checkpointing and (fit.micro_batch, fit.accumulation) == (2, 4)
    assert (1, False) in calls and (2, False) not in calls
    roomy = choose_micro_batch(linear(100 * MiB, 60 * MiB, 15 * MiB)[0], 8, 10**12)
    assert not roomy.activation_checkpointing and roomy.micro_batch == 8
    with pytest.raises(ValueError, match=r"one sample of this model and sequence length needs "
                                         r"115\.0 MiB at its peak even with activation "
                                         r"checkpointing, more than the 90\.0 MiB usable"):
        choose_micro_batch(linear(100 * MiB, 60 * MiB, 15 * MiB)[0], 8, 100 * MiB)


# -- activation checkpointing ---------------------------------------------------------------------

def saved_for_backward_bytes(model, ids) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for backward (outside checkpointed regions; the regions' inputs,
    which checkpointing holds itself, are added by the caller), and the gradients."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return sum(saved), grads


def test_activation_checkpointing_keeps_the_gradients_and_saves_activation_memory():
    model = micro_model(0, n_layers=4, max_seq_len=128).double().train()
    ids = torch.randint(0, 64, (4, 128), generator=torch.Generator().manual_seed(0))
    plain, plain_grads = saved_for_backward_bytes(model, ids)
    model.gradient_checkpointing = True
    outside, ckpt_grads = saved_for_backward_bytes(model, ids)
    block_inputs = 4 * ids.numel() * 32 * 8  # one (B, T, dim) fp64 input kept per block
    assert outside + block_inputs < 0.5 * plain, (outside, block_inputs, plain)
    for name, grad in plain_grads.items():  # the recomputed forward is the same arithmetic
        torch.testing.assert_close(ckpt_grads[name], grad, atol=reorder_bound(4 * 128 * 64 * 4),
                                   rtol=0, msg=name)


def test_the_cpu_measurement_sees_a_steps_own_peak():
    """A step that holds 64 MiB at once peaks about that much above where it started. Not to
    the byte: the resident size also counts file-backed pages (libraries), which the kernel may
    drop or page in meanwhile on a busy machine, so the band is an eighth either way."""
    def step() -> None:
        block = torch.ones(8 * MiB, dtype=torch.float64)  # 64 MiB, touched
        assert float(block[-1]) == 1.0

    before, peak = cpu_peak_bytes(step)
    assert before > 0 and 56 * MiB <= peak <= 72 * MiB, peak / MiB


# -- fitting a real run on CPU --------------------------------------------------------------------

def _grads_before_step(config):
    seen = []

    class Capture(TrainCallback):
        def on_step_begin(self, ctx):
            seen.append({n: p.grad.clone() for n, p in ctx.raw_model.named_parameters()
                         if p.grad is not None})

    return Trainer(config, callbacks=[Capture()]).train(), seen


def _measured_peaks(config, monkeypatch) -> dict[tuple[int, bool], int]:
    """The peaks a fit measures on this machine, through the builder's own path."""
    import astrai_train.recipes as recipes
    from astrai_train.builder import TrainContextBuilder

    captured: dict[tuple[int, bool], int] = {}
    real = recipes.fit_memory

    def spy(*args, **kwargs):
        fit = real(*args, **kwargs)
        captured.update(fit.measured)
        return fit

    monkeypatch.setattr(recipes, "fit_memory", spy)
    TrainContextBuilder(config).build()
    monkeypatch.setattr(recipes, "fit_memory", real)
    return captured


@pytest.mark.slow
def test_a_budget_that_forces_a_smaller_micro_batch_gives_the_requested_batchs_step(
        make_config, seq_file, tmp_path, capfd, monkeypatch):
    """float64, so the bounds derive from its epsilon: 8 samples x 128 tokens through 4 blocks
    of width <= 256 per gradient element (as tests/train/test_trainer.py's accumulation test)."""
    dataset = DatasetFactory.load("seq", seq_file, window_size=128)

    def config(name, **overrides):
        model = micro_model(0, dim=64, n_layers=4, dim_ffn=256, max_seq_len=128).double()
        fields = dict(model=model, dataset=dataset, strategy="seq", max_steps=1, batch_size=8,
                      max_grad_norm=0.0, out=str(tmp_path / name))
        return make_config(**{**fields, **overrides})

    # Calibrate on this machine: with room for everything, 1, 2 and 8 samples are measured.
    measured = _measured_peaks(config("calibrate", fit_memory="1000GiB"), monkeypatch)
    assert set(measured) == {(1, False), (2, False), (8, False)}
    one, two = measured[(1, False)], measured[(2, False)]
    per_sample = two - one
    assert per_sample > 4 * MiB  # activations dominate, so the budget below is not noise
    budget = int((two + per_sample) / (1 - MARGIN))  # room for 2 samples, not for 4
    capfd.readouterr()
    fitted, fitted_grads = _grads_before_step(config("fitted", fit_memory=str(budget)))
    assert (fitted.config.batch_size, fitted.config.accumulation_steps) == (2, 4)
    assert "chose micro-batch 2 x 4 accumulation, activation checkpointing off" in \
        capfd.readouterr().err
    requested, requested_grads = _grads_before_step(config("requested"))
    grad_error = reorder_bound(8 * 128 * 256 * 4)
    for name, grad in requested_grads[0].items():
        torch.testing.assert_close(fitted_grads[0][name], grad, atol=grad_error, rtol=0, msg=name)
    big = requested.raw_model.state_dict()
    for name, tensor in fitted.raw_model.state_dict().items():
        torch.testing.assert_close(tensor, big[name], rtol=0, msg=name,
                                   atol=adamw_drift_bound(1, 1e-3, grad_error))


@pytest.mark.slow
def test_astrai_train_fit_memory_auto_prints_its_choice(sft_file, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--strategy", "sft", "--data", str(sft_file), "--out", str(out), "--preset",
            "tiny", "--tokenizer", str(tokenizer_dir), "--batch-size", "4", "--max-seq-len", "16",
            "--fit-memory", "auto", "--max-steps", "1", "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "(--fit-memory auto chooses" in result.output
    assert re.search(r"fit-memory: budget .*chose micro-batch 4 x 1 accumulation", result.output)
    args[args.index("auto")] = "1MiB"
    args[args.index(str(out))] = str(tmp_path / "tiny")
    tiny = CliRunner().invoke(app, args)
    assert "--fit-memory: one sample of this model and sequence length needs" in str(tiny.exception)
    assert not (tmp_path / "tiny" / "step_00000001").exists()
