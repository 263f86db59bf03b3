"""The `astrai` CLI root and `astrai model init|info`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from astrai_core import AutoModel
from astrai_core.cli.main import app

runner = CliRunner()


def test_help_lists_installed_groups():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("model", "tokenizer"):
        assert group in result.output


def test_version_lists_every_installed_package():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "astrai-core 0.1.0"
    assert {"astrai-data 0.1.0", "astrai-serve 0.1.0", "astrai-train 0.1.0"} <= set(lines)


def test_model_init_writes_a_loadable_folder_and_info_describes_it(tmp_path):
    out = tmp_path / "tiny"
    result = runner.invoke(app, ["model", "init", "--preset", "tiny", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    model = AutoModel.from_pretrained(out)
    assert model.num_parameters() == 125_312
    info = runner.invoke(app, ["model", "info", str(out)])
    assert info.exit_code == 0, info.output
    assert "125,312" in info.output and "float32" in info.output and "KiB" in info.output


def test_model_init_is_deterministic_per_seed(tmp_path):
    for name in ("a", "b"):
        runner.invoke(app, ["model", "init", "--preset", "tiny", "--out", str(tmp_path / name)])
    a, b = (AutoModel.from_pretrained(tmp_path / n) for n in ("a", "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_model_init_refuses_to_overwrite(tmp_path):
    out = tmp_path / "m"
    assert runner.invoke(app, ["model", "init", "--preset", "tiny", "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["model", "init", "--preset", "tiny", "--out", str(out)])
    assert isinstance(result.exception, FileExistsError)
    assert "--overwrite" in str(result.exception)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model", "init", "--preset", "huge", "--out", "{tmp}/x"], "unknown preset 'huge'"),
        (["model", "info", "{tmp}/missing"], "does not exist"),
    ],
)
def test_user_errors_print_one_line_and_exit_nonzero(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", "astrai_core.cli.main", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
