"""Each package installs alone: an environment synced with one package imports it and core, and
nothing of the packages (or heavy dependencies) it does not declare."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = os.environ.get("UV") or shutil.which("uv")

CHECK = """
import importlib, sys
must, must_not = sys.argv[1].split(","), sys.argv[2].split(",")
for name in must:
    importlib.import_module(name)
leaked = []
for name in must_not:
    try:
        importlib.import_module(name)
        leaked.append(name)
    except ImportError:
        pass
assert not leaked, f"importable but not declared: {leaked}"
print("ok")
"""

CASES = {
    "astrai-core": ("astrai_core,astrai_core.cli.main", "astrai_data,astrai_train,astrai_serve,h5py,fastapi"),
    "astrai-serve": ("astrai_serve,astrai_core", "astrai_train,astrai_data,h5py"),
    "astrai-data": ("astrai_data,astrai_core,h5py", "astrai_train,astrai_serve,fastapi"),
    "astrai-train": ("astrai_train,astrai_data,astrai_core", "astrai_serve,fastapi"),
}


@pytest.mark.slow
@pytest.mark.skipif(UV is None, reason="uv is not on PATH")
@pytest.mark.parametrize("package", list(CASES))
def test_package_installs_alone(package, tmp_path):
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv")}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([UV, "sync", "--locked", "--no-dev", "--package", package, "--quiet"],
                   cwd=ROOT, env=env, check=True, timeout=600)
    python = tmp_path / "venv" / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    must, must_not = CASES[package]
    result = subprocess.run([str(python), "-c", CHECK, must, must_not], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    cli = tmp_path / "venv" / "bin" / "astrai"
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.split()[:2] == ["astrai-core", "0.1.0"]
    assert package in version.stdout
