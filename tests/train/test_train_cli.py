"""`astrai train`: the start table, config file + flags, resume, and every user error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from astrai_core import AutoModel, Checkpoint
from astrai_core.cli.main import app
from astrai_train import TrainConfig
from astrai_train.cli import parse_extra

runner = CliRunner()


@pytest.fixture
def base_args(seq_file, tokenizer_dir, tmp_path) -> list[str]:
    return ["train", "--strategy", "seq", "--data", str(seq_file), "--out", str(tmp_path / "run"),
            "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--max-seq-len", "16",
            "--batch-size", "2", "--no-progress", "--device", "cpu"]


def _invoke(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=True)


def test_train_prints_the_start_table_and_writes_a_servable_checkpoint(base_args, tmp_path):
    result = _invoke([*base_args, "--max-steps", "2", "--ckpt-interval", "1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for row in ("parameters", "tokens per optimizer step", "steps", "estimated time"):
        assert row in result.output
    assert "32 " in result.output  # 2 samples x 16 tokens per step
    assert "done: 2 steps" in result.output
    ckpt = tmp_path / "run" / "step_00000002"
    assert (ckpt / "tokenizer.json").is_file()
    model = AutoModel.from_pretrained(ckpt)
    assert model.config.vocab_size == 64 and model.config.dim == 64  # tiny, sized by the tokenizer


def test_config_file_and_flags_compose_and_flags_win(base_args, tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('batch_size = 4\nlearning_rate = 0.002\nmax_steps = 1\nwarmup_steps = 0\n'
                    'extra_kwargs = { label_smoothing = 0.1 }\n')
    result = _invoke([*base_args, "--config", str(toml), "--learning-rate", "0.005"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    launch = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert launch["batch_size"] == 2  # the flag beats the file
    assert Path(launch["data"]).is_absolute() and Path(launch["tokenizer"]).is_absolute()
    assert launch["learning_rate"] == 0.005
    assert launch["max_steps"] == 1  # from the file
    assert launch["extra_kwargs"] == {"label_smoothing": 0.1}
    saved = Checkpoint.load(tmp_path / "run" / "step_00000001").states["trainer"]["config"]
    assert saved["learning_rate"] == 0.005 and saved["batch_size"] == 2


def test_resume_continues_from_the_latest_checkpoint_with_the_saved_options(base_args, tmp_path):
    assert _invoke([*base_args, "--max-steps", "2"]).exit_code == 0
    result = _invoke(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "resuming after 2" in result.output
    assert Checkpoint.load(tmp_path / "run" / "step_00000004").iteration == 4


@pytest.mark.parametrize(("change", "error", "message"), [
    (["--model", "somewhere"], ValueError, "exactly one of --model DIR"),
    (["--batch-size", "0"], ValueError, r"TrainConfig\.batch_size must be an integer >= 1"),
    (["--strategy", "ppo"], ValueError, r"TrainConfig\.strategy must be one of"),
    (["--data", "missing.h5"], FileNotFoundError, "missing.h5 does not exist"),
    (["--resume"], FileNotFoundError, "no checkpoint in .*drop --resume"),
    (["--extra-kwargs", "novalue"], ValueError, "expects KEY=VALUE"),
    (["--strategy", "dpo"], ValueError, "holds a 'seq' dataset"),
])
def test_user_errors_say_what_to_fix(base_args, change, error, message):
    result = _invoke([*base_args, *change])
    assert isinstance(result.exception, error), result.output
    assert result.exception is not None and __import__("re").search(message, str(result.exception))


def test_preset_needs_a_tokenizer_and_an_existing_run_needs_resume(base_args, seq_file, tmp_path):
    args = ["train", "--data", str(seq_file), "--out", str(tmp_path / "r"), "--preset", "tiny"]
    result = _invoke(args)
    assert isinstance(result.exception, ValueError) and "needs --tokenizer DIR" in str(result.exception)
    assert _invoke([*base_args, "--max-steps", "1"]).exit_code == 0
    result = _invoke([*base_args, "--max-steps", "1"])
    assert isinstance(result.exception, FileExistsError)
    assert "already holds checkpoints (latest: step_00000001); pass --resume" in str(result.exception)


def test_out_and_data_are_required(tmp_path):
    result = _invoke(["train", "--preset", "tiny"])
    assert isinstance(result.exception, ValueError) and "--out is required" in str(result.exception)
    result = _invoke(["train", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, ValueError) and "--data is required" in str(result.exception)


def test_config_file_errors_name_the_file_and_key(base_args, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("batchsize = 3\n")
    result = _invoke([*base_args, "--config", str(bad)])
    assert isinstance(result.exception, ValueError) and "unknown key(s) batchsize" in str(result.exception)
    bad.write_text("batch_size = \n")
    assert "invalid TOML" in str(_invoke([*base_args, "--config", str(bad)]).exception)


def test_every_trainconfig_value_field_has_a_flag():
    command = typer.main.get_command(app).commands["train"]
    flags = {opt for param in command.params for opt in param.opts}
    for f in TrainConfig.value_fields():
        assert "--" + f.name.replace("_", "-") in flags, f.name  # flag name == field name
    assert "--resume" in flags and "--config" in flags


def test_extra_kwargs_values_are_json_or_text():
    assert parse_extra(["a=1", "b=[1, 2]", "c=hello"]) == {"a": 1, "b": [1, 2], "c": "hello"}
    assert parse_extra(None) is None


def test_the_astrai_cli_lists_train():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "train" in result.output
    assert torch.get_num_threads() >= 1


def test_a_stopped_run_says_how_to_continue_and_a_non_finite_one_fails_in_one_line(
        base_args, monkeypatch):
    import types

    from astrai_train import NonFiniteLossError, cli

    class Stopped:
        def __init__(self, config, callbacks=None):
            pass

        def train(self, checkpoint=None):
            return types.SimpleNamespace(stop_requested="SIGTERM", iteration=3, loss=1.0,
                                         last_checkpoint="run/step_00000003")

    monkeypatch.setattr(cli, "Trainer", Stopped)
    result = _invoke(base_args)
    assert result.exit_code == cli.EXIT_STOPPED == 75  # neither success nor failure: requeue
    assert "stopped by SIGTERM after step 3; saved run/step_00000003" in result.output
    assert "--resume" in result.output

    class Diverged(Stopped):
        def train(self, checkpoint=None):
            raise NonFiniteLossError("step 4: non-finite loss")

    monkeypatch.setattr(cli, "Trainer", Diverged)
    result = _invoke([*base_args, "--out", str(Path(base_args[6]).parent / "other")])
    assert result.exit_code == 1 and "error: step 4: non-finite loss" in result.output


def test_resume_skips_a_corrupt_newest_checkpoint_and_says_so(base_args, tmp_path):
    assert _invoke([*base_args, "--max-steps", "2", "--ckpt-interval", "1",
                    "--keep-last", "0"]).exit_code == 0
    run = tmp_path / "run"
    weights = run / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    result = _invoke(["train", "--out", str(run), "--resume", "--max-steps", "3"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "step_00000002 is unreadable" in result.output
    assert "resuming from step_00000001" in result.output and "resuming after 1" in result.output
    assert (run / "step_00000002.corrupt" / "model.safetensors").is_file()  # kept, not deleted
    assert Checkpoint.load(run / "step_00000003").iteration == 3


def test_resume_with_no_intact_checkpoint_fails_in_one_line(base_args, tmp_path):
    assert _invoke([*base_args, "--max-steps", "1"]).exit_code == 0
    weights = tmp_path / "run" / "step_00000001" / "model.safetensors"
    weights.write_bytes(b"")
    result = _invoke(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "2"])
    assert isinstance(result.exception, ValueError)
    assert "no checkpoint in" in str(result.exception) and "can be read" in str(result.exception)


def test_a_model_folder_without_a_tokenizer_is_refused_before_training(seq_file, tokenizer_dir,
                                                                     tmp_path):
    model_dir = tmp_path / "bare"
    assert runner.invoke(app, ["model", "init", "--preset", "tiny", "--vocab-size", "64",
                               "--out", str(model_dir)]).exit_code == 0
    args = ["train", "--data", str(seq_file), "--out", str(tmp_path / "run"), "--model",
            str(model_dir), "--max-seq-len", "16", "--batch-size", "2", "--max-steps", "1",
            "--no-progress", "--device", "cpu"]
    result = _invoke(args)
    assert isinstance(result.exception, ValueError) and "has no tokenizer" in str(result.exception)
    assert "--tokenizer DIR" in str(result.exception)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    result = _invoke([*args, "--tokenizer", str(tokenizer_dir)])  # carried into checkpoints
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (tmp_path / "run" / "step_00000001" / "tokenizer.json").is_file()
