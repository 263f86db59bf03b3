"""Distributed training on CPU with gloo, 2 processes: DDP and FSDP2 equal one process on the
union of the ranks' batches, accumulation skips the sync without changing the result, FSDP
checkpoints load in one process and resume bit-identically, failures end the run clearly."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from train_helpers import MICRO_GRAD_TERMS, micro_model

from astrai_core import Checkpoint
from astrai_data import DatasetFactory
from astrai_train import TrainCallback, TrainConfig, Trainer
from astrai_train.parallel import (
    DistributedWorkerError,
    gather_tensor_parallel_state_dict,
    get_rank,
    get_world_size,
    gradient_sync,
    parallelize_transformer,
    resolve_port,
    spawn_parallel_fn,
)
from tolerances import adamw_drift_bound, reorder_bound

WORLD = 2
# Clipping at 0.3 is active (the first norms are ~0.8): equality also proves the global norm.
# The runs compute in float64, so the tolerances below (derived from float64's epsilon, see
# train_helpers) are far below any real defect (a lost or doubled rank moves weights ~lr = 1e-3)
# and far above the reordering noise of any CPU.
GRAD_ERROR = reorder_bound(MICRO_GRAD_TERMS)
LOSS_ERROR = reorder_bound(4 * 16 * 64, scale=10.0)  # 64 tokens x a 64-way logsumexp, |logit| < 10
NORM_REL_ERROR = GRAD_ERROR * 200 / 0.3  # sqrt(~40k parameters) x per-element error / norm > 0.3
COMMON = dict(learning_rate=1e-3, progress=False, device="cpu", scheduler="constant",
              seed=0, max_grad_norm=0.3, log_interval=1)


def _config(data: str, out: str, **overrides: Any) -> TrainConfig:
    dataset = DatasetFactory.load("seq", data, window_size=16)
    return TrainConfig(model=micro_model(0).double(), dataset=dataset, out=out,
                       **{**COMMON, **overrides})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        diff = (got[name].double() - tensor.double()).abs().max().item()
        assert diff <= atol, f"{name}: max difference {diff}"


def _logged(out: Path, key: str) -> list[float]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


# -- workers (module level: spawned processes import them by name) ----------------------------
def _ddp_worker(data: str, tmp: str) -> None:
    assert get_world_size() == WORLD
    rank = get_rank()
    # Per rank batch 2 -> the union of the ranks' batches is one batch of 4 of a single process.
    plain = Trainer(_config(data, f"{tmp}/ddp", batch_size=2, max_steps=3)).train()
    # Batch 1 x 2 micro-batches: the sync of the first is skipped (no_sync); same samples.
    accum = Trainer(_config(data, f"{tmp}/acc", batch_size=1, accumulation_steps=2,
                            max_steps=3)).train()
    assert _allreduces_in_a_window(accum.model, micro_batches=3) == 1
    if rank == 0:
        torch.save({"ddp": _weights(plain.raw_model), "acc": _weights(accum.raw_model),
                    "loss": plain.loss, "tokens": plain.tokens_seen}, f"{tmp}/ddp.pt")


def _allreduces_in_a_window(ddp: torch.nn.Module, micro_batches: int) -> int:
    """Gradient all-reduces of one accumulation window run the way the Trainer runs it."""
    calls = []

    def hook(state, bucket):  # unannotated: DDP checks real annotations, not strings
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    for i in range(micro_batches):
        with gradient_sync(ddp, enabled=i == micro_batches - 1):
            ddp(torch.randint(5, 64, (1, 8))).float().mean().backward()
    return calls.count(0)  # each sync reduces every bucket once


def _fsdp_worker(data: str, tmp: str) -> None:
    # 4 steps with checkpoints at 2 and 4, then a second run resumed from step 2.
    Trainer(_config(data, f"{tmp}/fsdp", batch_size=2, max_steps=4, ckpt_interval=2,
                    parallel="fsdp")).train()
    resumed = _config(data, f"{tmp}/resumed", batch_size=2, max_steps=4, ckpt_interval=2,
                      parallel="fsdp")
    Trainer(resumed).train(Path(tmp) / "fsdp" / "step_00000002")
    # SIGTERM to rank 1 only, mid-window: every rank stops after that same step and joins the
    # (collective) final checkpoint, instead of rank 0 waiting in the next step's reduce.
    stopped = Trainer(_config(data, f"{tmp}/stopped", batch_size=1, accumulation_steps=2,
                              max_steps=10, parallel="fsdp"), callbacks=[_SignalRankOne()]).train()
    assert stopped.iteration == 3 and stopped.stop_requested is not None


class _SignalRankOne(TrainCallback):
    def on_batch_end(self, ctx: Any) -> None:
        if ctx.rank == 1 and ctx.iteration == 2 and ctx.stop_pending is None:
            os.kill(os.getpid(), signal.SIGTERM)


def _tensor_parallel_worker(data: str, tmp: str) -> None:
    # Both ranks read the same batches (parallel="none": no data parallelism) and hold half of
    # every attention and MLP; checkpoints gather the full weights.
    model = parallelize_transformer(micro_model(0).double())
    config = _config(data, f"{tmp}/tp", batch_size=2, max_steps=3, parallel="none",
                     state_dict_fn=gather_tensor_parallel_state_dict).replace(model=model)
    Trainer(config).train()


def _failing_worker() -> None:
    if get_rank() == 1:
        raise ValueError("rank one broke")
    dist.barrier()  # rank 0 waits for rank 1, which never comes


def _stalled_worker() -> None:
    if get_rank() == 1:
        time.sleep(120)  # alive but stuck: only the timeout can end rank 0's wait
    dist.barrier()


def _reference(data: str, out: str, steps: int) -> dict[str, torch.Tensor]:
    """One process, batch 4: the same samples per step as 2 ranks of batch 2."""
    context = Trainer(_config(data, out, batch_size=4, max_steps=steps)).train()
    return _weights(context.raw_model)


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_and_accumulation_equal_one_process_on_the_union_of_batches(seq_file, tmp_path):
    spawn_parallel_fn(_ddp_worker, WORLD, str(seq_file), str(tmp_path), device_type="cpu")
    got = torch.load(tmp_path / "ddp.pt")
    reference = _reference(str(seq_file), str(tmp_path / "single"), steps=3)
    drift = adamw_drift_bound(3, COMMON["learning_rate"], GRAD_ERROR)
    _assert_close(got["ddp"], reference, atol=drift)
    _assert_close(got["acc"], reference, atol=drift)
    single = Trainer(_config(str(seq_file), str(tmp_path / "single1"), batch_size=4,
                             max_steps=3)).train()
    assert got["loss"] == pytest.approx(single.loss, abs=LOSS_ERROR)  # the mean over ranks is logged
    assert got["tokens"] == single.tokens_seen  # tokens summed over ranks
    assert (tmp_path / "ddp" / "step_00000003").is_dir()  # written once, by rank 0
    # AdamW hardly sees a clipping scale, so check the logged global norm directly.
    norms = _logged(tmp_path / "single", "grad_norm")
    assert min(norms) > COMMON["max_grad_norm"]  # clipping was active
    assert _logged(tmp_path / "ddp", "grad_norm") == pytest.approx(norms, rel=NORM_REL_ERROR)
    assert _logged(tmp_path / "ddp", "loss") == pytest.approx(_logged(tmp_path / "single", "loss"),
                                                              abs=LOSS_ERROR)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_equals_one_process_and_its_checkpoint_loads_and_resumes_exactly(seq_file, tmp_path):
    spawn_parallel_fn(_fsdp_worker, WORLD, str(seq_file), str(tmp_path), device_type="cpu")
    reference = _reference(str(seq_file), str(tmp_path / "single"), steps=4)
    final = Checkpoint.load(tmp_path / "fsdp" / "step_00000004")
    drift = adamw_drift_bound(4, COMMON["learning_rate"], GRAD_ERROR)
    _assert_close(final.state_dict, reference, atol=drift)
    # The checkpoint of 2 sharded ranks loads into one plain model.
    model = micro_model(1).double()
    model.load_state_dict(final.state_dict)
    _assert_close(_weights(model), reference, atol=drift)
    # The global norm over the DTensor shards, as one process computes it (clipping active).
    norms = _logged(tmp_path / "single", "grad_norm")
    assert min(norms) > COMMON["max_grad_norm"]
    assert _logged(tmp_path / "fsdp", "grad_norm") == pytest.approx(norms, rel=NORM_REL_ERROR)
    assert [p.name for p in (tmp_path / "stopped").glob("step_*")] == ["step_00000003"]
    # Resuming at step 2 with the same world size is bit-identical, optimizer state included.
    resumed = Checkpoint.load(tmp_path / "resumed" / "step_00000004")
    for name, tensor in final.state_dict.items():
        assert torch.equal(resumed.state_dict[name], tensor), name
    assert final.states["optimizer"].keys() == resumed.states["optimizer"].keys()
    state, again = final.states["optimizer"]["state"], resumed.states["optimizer"]["state"]
    assert set(state) == set(again) and all(
        torch.equal(state[p][k], again[p][k]) for p in state for k in state[p])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensor_parallel_training_equals_one_process(seq_file, tmp_path):
    spawn_parallel_fn(_tensor_parallel_worker, WORLD, str(seq_file), str(tmp_path),
                      device_type="cpu")
    single = Trainer(_config(str(seq_file), str(tmp_path / "single"), batch_size=2,
                             max_steps=3)).train()
    tp = Checkpoint.load(tmp_path / "tp" / "step_00000003")
    _assert_close(tp.state_dict, _weights(single.raw_model),
                  atol=adamw_drift_bound(3, COMMON["learning_rate"], GRAD_ERROR))
    norms = _logged(tmp_path / "single", "grad_norm")
    assert min(norms) > COMMON["max_grad_norm"]  # clipping was active
    assert _logged(tmp_path / "tp", "grad_norm") == pytest.approx(norms, rel=NORM_REL_ERROR)


@pytest.mark.timeout(120)
def test_a_failing_rank_is_named_and_stops_the_others(tmp_path):
    start = time.monotonic()
    with pytest.raises(DistributedWorkerError, match=r"rank 1 failed: ValueError: rank one broke"):
        spawn_parallel_fn(_failing_worker, WORLD, device_type="cpu", timeout_s=60)
    assert time.monotonic() - start < 60  # the others are stopped, not left waiting


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stuck_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(DistributedWorkerError, match=r"rank 0 failed: .*"):
        spawn_parallel_fn(_stalled_worker, WORLD, device_type="cpu", timeout_s=5)
    assert time.monotonic() - start < 60


def test_a_port_in_use_gives_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"master port {port} is already in use.*"
                                             r"--master-port"):
            spawn_parallel_fn(_failing_worker, WORLD, master_port=port, device_type="cpu")
    assert resolve_port("localhost", "auto") > 0


def test_nprocs_and_parallel_are_plain_config_values():
    config = TrainConfig(nprocs=4, parallel="fsdp", dist_timeout_s=30)
    assert config.to_dict()["parallel"] == "fsdp"
    with pytest.raises(ValueError, match=r"TrainConfig\.parallel must be one of"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ValueError, match=r"TrainConfig\.master_port must be a port number"):
        TrainConfig(master_port="http")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_astrai_train_nprocs_2_runs_end_to_end_on_cpu(seq_file, tokenizer_dir, tmp_path):
    from typer.testing import CliRunner

    from astrai_core import AutoModel
    from astrai_core.cli.main import app

    out = tmp_path / "run"
    args = ["train", "--strategy", "seq", "--data", str(seq_file), "--out", str(out),
            "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--max-seq-len", "16",
            "--batch-size", "2", "--no-progress", "--device", "cpu", "--nprocs", "2",
            "--parallel", "fsdp", "--max-steps", "2", "--log-interval", "1"]
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "processes" in result.output and "done: 2 steps" in result.output
    model = AutoModel.from_pretrained(out / "step_00000002")  # a servable model folder
    assert model.config.vocab_size == 64
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # logged once, by rank 0


def test_astrai_train_joins_a_torchrun_process_group(seq_file, tokenizer_dir, tmp_path,
                                                     monkeypatch):
    """torchrun's environment (here a world of one) makes `astrai train` join its group."""
    from typer.testing import CliRunner

    from astrai_core.cli.main import app

    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(resolve_port("127.0.0.1", "auto")))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = ["train", "--strategy", "seq", "--data", str(seq_file), "--out", str(tmp_path / "run"),
            "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--max-seq-len", "16",
            "--batch-size", "2", "--no-progress", "--device", "cpu", "--parallel", "ddp",
            "--max-steps", "1"]
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "done: 1 steps" in result.output
    assert not dist.is_initialized()  # left as found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_runs_python_m_astrai_train_on_2_processes(seq_file, tokenizer_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "-m", "astrai_train", "train", "--strategy", "seq", "--data", str(seq_file),
               "--out", str(out), "--preset", "tiny", "--tokenizer", str(tokenizer_dir),
               "--max-seq-len", "16", "--batch-size", "2", "--no-progress",
               "--device", "cpu", "--max-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("done: 2 steps") == 1  # rank 0 reports
    assert "2 (auto" in done.stdout  # the start table shows the world size
    checkpoint = Checkpoint.load(out / "step_00000002")
    assert checkpoint.states["sampler"]["world_size"] == 2
