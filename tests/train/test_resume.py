"""Exact resume: a run interrupted at any step (an exception, or kill -9 in a subprocess) and
resumed from its latest checkpoint ends bit-identical to a run never interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import DropoutLM, micro_model, resume_config

from astrai_core import Checkpoint
from astrai_data import DatasetFactory
from astrai_train import TrainCallback, Trainer, find_latest_checkpoint
from astrai_train.rng import capture_rng_state, restore_rng_state


class Crash(TrainCallback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, ctx):
        if ctx.iteration == self.at_step:
            raise RuntimeError("simulated crash")


def _uninterrupted(seq_file, out):
    return Trainer(resume_config(seq_file, out)).train()


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_after_a_crash_between_checkpoints_is_bit_identical(seq_file, tmp_path):
    reference = _uninterrupted(seq_file, tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):  # after step 5, checkpoints: 3
        Trainer(resume_config(seq_file, tmp_path / "b"), callbacks=[Crash(5)]).train()
    latest = find_latest_checkpoint(tmp_path / "b")
    assert latest.name == "step_00000003"
    # A differently initialised model: everything must come from the checkpoint.
    resumed = Trainer(resume_config(seq_file, tmp_path / "b", model=DropoutLM(seed=9))).train(latest)
    assert resumed.iteration == 8 and resumed.loss == reference.loss
    assert resumed.samples_seen == reference.samples_seen == 8 * 2 * 2  # steps x batches x samples
    assert resumed.tokens_seen == reference.tokens_seen == 32 * 16
    _assert_same_weights(resumed.raw_model.state_dict(), reference.raw_model.state_dict())
    for step in (6, 8):
        _assert_same_weights(Checkpoint.load(tmp_path / "b" / f"step_{step:08d}").state_dict,
                             Checkpoint.load(tmp_path / "a" / f"step_{step:08d}").state_dict)
    a_opt = Checkpoint.load(tmp_path / "a" / "step_00000008").states["optimizer"]["state"]
    b_opt = Checkpoint.load(tmp_path / "b" / "step_00000008").states["optimizer"]["state"]
    for key in a_opt:
        assert all(torch.equal(a_opt[key][k], b_opt[key][k]) for k in a_opt[key])


def test_the_rng_state_matters_for_exactness(seq_file, tmp_path):
    """Control: resuming without the saved RNG state diverges, so the test above is not vacuous."""
    reference = _uninterrupted(seq_file, tmp_path / "a")
    Trainer(resume_config(seq_file, tmp_path / "b", max_steps=3)).train()
    ckpt = Checkpoint.load(tmp_path / "b" / "step_00000003")
    ckpt.states["rng"]["torch"] = torch.manual_seed(1234).get_state()
    resumed = Trainer(resume_config(seq_file, tmp_path / "b")).train(ckpt)
    weights = resumed.raw_model.state_dict()
    assert not all(torch.equal(v, reference.raw_model.state_dict()[k]) for k, v in weights.items())


KILL_SCRIPT = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from train_helpers import resume_config
from astrai_train import Trainer, TrainCallback

class Kill(TrainCallback):
    def on_batch_end(self, ctx):
        if ctx.iteration == 5 and ctx.sampler.iter % 2 == 1:  # inside step 6's window
            os.kill(os.getpid(), signal.SIGKILL)

Trainer(resume_config({data!r}, {out!r}, num_workers=2), callbacks=[Kill()]).train()
"""


@pytest.mark.slow
def test_resume_after_kill_9_is_bit_identical(seq_file, tmp_path):
    out = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(),
                                data=str(seq_file), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    latest = find_latest_checkpoint(out)
    assert latest.name == "step_00000003"
    logged = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]
    resumed = Trainer(resume_config(seq_file, out)).train(latest)
    reference = _uninterrupted(seq_file, tmp_path / "reference")
    _assert_same_weights(resumed.raw_model.state_dict(), reference.raw_model.state_dict())
    logged = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))  # the steps after the checkpoint are logged once


def test_resume_refuses_a_changed_run(seq_file, tmp_path, dpo_file):
    Trainer(resume_config(seq_file, tmp_path / "a", max_steps=3)).train()
    ckpt = Checkpoint.load(tmp_path / "a" / "step_00000003")
    with pytest.raises(ValueError, match="batch_size=2, this run has batch_size=4"):
        Trainer(resume_config(seq_file, tmp_path / "a", batch_size=4)).train(ckpt)
    with pytest.raises(ValueError, match="weights do not fit this model"):
        Trainer(resume_config(seq_file, tmp_path / "a", model=micro_model())).train(ckpt)
    dpo = DatasetFactory.load("dpo", dpo_file)
    with pytest.raises(ValueError, match="written by a 'seq' run; resume it with --strategy seq"):
        Trainer(resume_config(seq_file, tmp_path / "a", strategy="dpo", dataset=dpo)).train(ckpt)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        Trainer(resume_config(seq_file, tmp_path / "a")).train(Checkpoint(ckpt.state_dict, 3))


def test_a_dpo_resume_refuses_another_reference(dpo_file, tmp_path):
    dataset = DatasetFactory.load("dpo", dpo_file)
    config = dict(strategy="dpo", dataset=dataset, max_steps=2, ckpt_interval=2)
    Trainer(resume_config(dpo_file, tmp_path, model=micro_model(0), **config)).train()
    latest = find_latest_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="reference model differs"):
        Trainer(resume_config(dpo_file, tmp_path, model=micro_model(1), **config)).train(latest)
    # The same starting policy resumes (the reference is that policy, not the checkpoint).
    context = Trainer(resume_config(dpo_file, tmp_path, model=micro_model(0),
                                    **{**config, "max_steps": 3})).train(latest)
    assert context.iteration == 3


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = capture_rng_state()
    want = (torch.rand(3), random.random(), np.random.rand())
    Checkpoint({}, states={"rng": state}).save(tmp_path / "c")
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    restore_rng_state(Checkpoint.load(tmp_path / "c").states["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
