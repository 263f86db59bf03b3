"""Mixture-of-experts training on 2 CPU processes with gloo, DDP and FSDP2: the expert loads are
all-reduced before the bias update, so every rank keeps the same biases, equal to those of one
process on the union of the ranks' batches; the weights match it as dense models do
(test_distributed.py), and FSDP checkpoints hold the biases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import MICRO_GRAD_TERMS, micro_model

from astrai_core import Checkpoint, moe_layers
from astrai_data import DatasetFactory
from astrai_train import TrainConfig, Trainer
from astrai_train.parallel import get_rank, spawn_parallel_fn
from tolerances import adamw_drift_bound, reorder_bound

WORLD = 2
MOE = dict(n_experts=4, n_experts_per_token=2, dim_expert=16, n_shared_experts=1)
# No balance loss: it is computed per micro-batch (f_i P_i is not linear in the batch), so with
# it N ranks legitimately differ from one process on their union, as accumulation does.
COMMON = dict(learning_rate=1e-3, progress=False, device="cpu", scheduler="constant", seed=0,
              max_grad_norm=0.3, log_interval=1, moe_bias_update_rate=0.01)
STEPS = 3
DRIFT = adamw_drift_bound(STEPS, COMMON["learning_rate"], reorder_bound(MICRO_GRAD_TERMS))


def _config(data: str, out: str, **overrides: Any) -> TrainConfig:
    dataset = DatasetFactory.load("seq", data, window_size=16)
    return TrainConfig(model=micro_model(0, **MOE).double(), dataset=dataset, out=out,
                       max_steps=STEPS, **{**COMMON, **overrides})


def _biases(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.gate.e_score_correction_bias.detach().clone() for m in moe_layers(model)]


def _loads(out: Path) -> list[Any]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["moe_tokens_per_expert"] for line in lines]


def _worker(data: str, tmp: str, parallel: str) -> None:
    # Per rank batch 2: together one batch of 4 of a single process.
    ctx = Trainer(_config(data, f"{tmp}/{parallel}", batch_size=2, ckpt_interval=STEPS,
                          parallel=parallel)).train()
    torch.save(_biases(ctx.raw_model), f"{tmp}/{parallel}_biases_rank{get_rank()}.pt")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_every_rank_keeps_the_biases_of_one_process_on_the_union_of_batches(
        seq_file, tmp_path, parallel):
    spawn_parallel_fn(_worker, WORLD, str(seq_file), str(tmp_path), parallel, device_type="cpu")
    single = Trainer(_config(str(seq_file), str(tmp_path / "single"), batch_size=4)).train()
    want = _biases(single.raw_model)
    assert any(bool(b.any()) for b in want)  # the update moved them
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{parallel}_biases_rank{rank}.pt")
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), rank
    # The loads logged (and used) are the sums over both ranks, step by step.
    assert _loads(tmp_path / parallel) == _loads(tmp_path / "single")
    checkpoint = Checkpoint.load(tmp_path / parallel / f"step_{STEPS:08d}")
    reference = single.raw_model.state_dict()
    assert checkpoint.state_dict.keys() == reference.keys()
    for name, tensor in reference.items():
        diff = (checkpoint.state_dict[name].double() - tensor).abs().max().item()
        assert diff <= (0.0 if name.endswith("e_score_correction_bias") else DRIFT), name
