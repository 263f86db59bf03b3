"""Callbacks: checkpoint rotation and layout, metric log, optional TensorBoard/matplotlib,
progress bar, factory."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types

import pytest
import torch
from rich.console import Console
from train_helpers import micro_model

from astrai_core import AutoModel, Checkpoint
from astrai_data import DatasetFactory
from astrai_train import (
    CallbackFactory,
    CheckpointCallback,
    GradientClippingCallback,
    MetricLoggerCallback,
    ProgressBarCallback,
    Trainer,
)


def test_checkpoints_keep_the_last_k_and_are_servable_model_folders(
        make_config, seq_dataset, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", ""])  # a pid no process has any more
    child.wait()
    (out / ".step_00000009.tmp-dead").mkdir(parents=True)  # left by a killed run (no pid)
    (out / f".step_00000008.old-{child.pid}-0").mkdir()  # left by a killed run (dead pid)
    model = micro_model()
    config = make_config(model=model, dataset=seq_dataset, max_steps=5, ckpt_interval=1,
                         keep_last=2, tokenizer=str(tokenizer_dir))
    Trainer(config).train()
    assert sorted(p.name for p in out.iterdir()) == ["logs", "step_00000004", "step_00000005"]
    last = out / "step_00000005"
    assert (last / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert (last / "tokenizer_config.json").is_file()
    loaded = AutoModel.from_pretrained(last)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    state = Checkpoint.load(last)
    assert set(state.states) == {"optimizer", "scheduler", "sampler", "rng", "trainer"}
    assert state.states["trainer"]["config"]["max_steps"] == 5
    assert state.states["trainer"]["tokens_seen"] == 5 * 2 * 16


def test_a_final_checkpoint_is_written_when_training_ends_between_intervals(
        make_config, seq_dataset, tmp_path):
    Trainer(make_config(model=micro_model(), dataset=seq_dataset, max_steps=5, ckpt_interval=3)).train()
    assert sorted(p.name for p in (tmp_path / "out").glob("step_*")) == ["step_00000003",
                                                                       "step_00000005"]


def test_metric_log_has_one_line_per_interval_with_strategy_metrics(make_config, dpo_file, tmp_path):
    dataset = DatasetFactory.load("dpo", dpo_file)
    config = make_config(model=micro_model(), dataset=dataset, strategy="dpo", max_steps=5,
                         log_interval=2, log_dir=str(tmp_path / "logs"))
    Trainer(config).train()
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5]  # the final step is logged too
    first = lines[0]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "reward_accuracy",
            "reward_margin", "rewards_chosen", "rewards_rejected"} <= set(first)
    assert first["tokens_per_s"] > 0 and first["grad_norm"] > 0
    assert not (tmp_path / "logs" / "tensorboard").exists()  # tensorboard is not installed


def test_tensorboard_is_used_when_installed(make_config, seq_dataset, monkeypatch):
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            scalars.append(("closed", -1))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=SummaryWriter))
    Trainer(make_config(model=micro_model(), dataset=seq_dataset, max_steps=3, log_interval=1)).train()
    assert ("train/loss", 3) in scalars and scalars[-1] == ("closed", -1)


def test_the_loss_curve_is_a_png_with_matplotlib_and_skipped_without(make_config, seq_dataset,
                                                                     tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    Trainer(make_config(model=micro_model(), dataset=seq_dataset, max_steps=3, log_interval=1,
                        out=str(tmp_path / "with"))).train()
    assert (tmp_path / "with" / "logs" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    Trainer(make_config(model=micro_model(), dataset=seq_dataset, max_steps=3, log_interval=1,
                        out=str(tmp_path / "without"))).train()
    assert (tmp_path / "without" / "logs" / "metrics.jsonl").is_file()
    assert not (tmp_path / "without" / "logs" / "loss.png").exists()


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log-file"])
def test_progress_shows_the_run_s_steps_loss_lr_throughput_and_eta(make_config, seq_dataset,
                                                                   terminal):
    stream = io.StringIO()
    console = Console(file=stream, width=150, force_terminal=terminal)
    # 1000 epochs bounded by max_steps (as the quickstart's stages): no fake epoch count.
    bar = ProgressBarCallback(num_epoch=1000, console=console, description="seq")
    Trainer(make_config(model=micro_model(), dataset=seq_dataset, max_steps=3, n_epoch=1000),
            callbacks=[bar]).train()
    text = stream.getvalue()
    assert "3/3" in text and "loss " in text and "tok/s" in text and "ETA" in text
    assert "epoch" not in text and "seq" in text
    if not terminal:  # plain lines, nothing cut: every field in full on one line per update
        last = text.strip().splitlines()[-1]
        assert last.startswith("seq step 3/3 (100%)") and "elapsed 0:00:" in last


def test_factory_creates_callbacks_by_name():
    assert {"checkpoint", "gradient_clipping", "metric_logger", "progress_bar", "scheduler"} <= set(
        CallbackFactory.list_registered())
    assert isinstance(CallbackFactory.create("gradient_clipping", max_grad_norm=2.0),
                      GradientClippingCallback)
    with pytest.raises(ValueError, match="unknown callback 'early_stop'"):
        CallbackFactory.create("early_stop")


@pytest.mark.parametrize(("make", "message"), [
    (lambda: GradientClippingCallback(-1.0), "max_grad_norm must be >= 0"),
    (lambda: CheckpointCallback("x", interval=0), "interval must be >= 1"),
    (lambda: CheckpointCallback("x", keep_last=-1), "keep_last must be >= 0"),
    (lambda: MetricLoggerCallback("x", save_interval=0), "save_interval must be >= 1"),
])
def test_invalid_callback_arguments_are_explained(make, message):
    with pytest.raises(ValueError, match=message):
        make()
