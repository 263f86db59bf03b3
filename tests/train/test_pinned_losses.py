"""A regression net for every refactor: the per-step losses of a tiny SEQ run are pinned in
assets/seq_losses.json and compared, exactly on the kind of machine that wrote them, within a
derived float64 bound anywhere else.

The run is reproducible by construction: float64, weights drawn with numpy's PCG64 (the same
bits on every platform; torch's CPU normal_ has vectorised variants per instruction set), data
from numpy, one thread-count and kernel family noted beside the losses.

To pin new losses after a change that is meant to change them (say why in the commit):
    ASTRAI_UPDATE_PINNED=1 uv run pytest tests/train/test_pinned_losses.py
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import MICRO_GRAD_TERMS, micro_model

from astrai_data import DatasetFactory
from astrai_train import TrainCallback, Trainer
from tolerances import adamw_drift_bound, forward_bound, reorder_bound

ASSET = Path(__file__).parent / "assets" / "seq_losses.json"
STEPS, LR, ADAM_EPS = 8, 1e-2, 1e-6


def _reproducible_model() -> torch.nn.Module:
    model = micro_model(0).double()
    rng = np.random.default_rng(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.from_numpy(rng.normal(0.0, 0.02, tuple(p.shape))))
    return model


def _machine() -> dict[str, object]:
    return {"torch": torch.__version__.split("+")[0], "kernels": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def _run(seq_file: Path, tmp_path: Path, make_config) -> list[float]:
    losses: list[float] = []

    class Record(TrainCallback):
        def on_step_end(self, ctx):
            losses.append(ctx.loss)

    config = make_config(model=_reproducible_model(),
                         dataset=DatasetFactory.load("seq", seq_file, window_size=16),
                         batch_size=4, max_steps=STEPS, learning_rate=LR, adam_eps=ADAM_EPS,
                         scheduler="cosine", warmup_steps=2, max_grad_norm=1.0,
                         out=str(tmp_path / "pinned"))
    Trainer(config, callbacks=[Record()]).train()
    return losses


def _bound(step: int) -> float:
    """Another CPU sums in another order. The loss at step k is computed with weights that may
    have drifted by the AdamW bound after k - 1 steps; a loss moves by at most (sum of |dL/dw|)
    times that, and sum |dL/dw| <= sqrt(#params ~ 40k) x ||g|| <= 200 (clipped to norm 1)."""
    drift = adamw_drift_bound(step, LR, reorder_bound(MICRO_GRAD_TERMS), adam_eps=ADAM_EPS)
    return forward_bound(2, 64, scale=10.0) + 200 * drift


def test_tiny_seq_run_reproduces_its_pinned_losses(seq_file, tmp_path, make_config):
    losses = _run(seq_file, tmp_path, make_config)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    if os.environ.get("ASTRAI_UPDATE_PINNED") == "1":
        ASSET.parent.mkdir(exist_ok=True)
        ASSET.write_text(json.dumps({"machine": _machine(), "losses": losses}, indent=2) + "\n")
        pytest.skip(f"pinned {len(losses)} losses in {ASSET}")
    pinned = json.loads(ASSET.read_text())
    if pinned["machine"] == _machine():
        assert losses == pinned["losses"]  # same kernels, threads and torch: bit for bit
    else:
        for step, (got, want) in enumerate(zip(losses, pinned["losses"], strict=True)):
            assert got == pytest.approx(want, abs=_bound(step)), f"step {step + 1}"
