"""`astrai_core.atomic`: files and folders appear complete or not at all, failed writes leave
nothing, and leftovers of killed writers are removed by the next write to the same target."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astrai_core import AutoModel, Checkpoint, atomic_dir, atomic_file, get_preset
from astrai_core import atomic as atomic_module
from astrai_core.atomic import is_stale, remove_stale_temps, temp_path


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (pids are handed out in order, so
    it is not reused within a test)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)
    return child.pid


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_file_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent.absolute() and tmp.name.startswith(".out.json.tmp-")
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert names(tmp_path) == ["out.json"]


def test_a_failed_file_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert names(tmp_path) == ["out.json"]


def test_atomic_dir_replaces_a_folder_as_a_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("from the old folder")
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert names(target) == ["config.json"]
    assert names(tmp_path) == ["model"]  # neither the temp nor the renamed-aside old folder


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(ValueError, match="bad shape"), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("new")
        raise ValueError("bad shape")
    assert (target / "config.json").read_text() == "old"
    assert names(tmp_path) == ["model"]


def test_atomic_dir_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(NotADirectoryError, match="model is a file; pass a folder path"), \
            atomic_dir(tmp_path / "model"):
        pass
    assert names(tmp_path) == ["model"]


def test_temp_names_carry_the_pid_and_match_the_checkpoint_cleanup_patterns():
    target = Path("/runs/out/step_00000007")
    tmp, old = temp_path(target), temp_path(target, "old")
    assert tmp.name.startswith(f".step_00000007.tmp-{os.getpid()}-")
    assert old.name.startswith(f".step_00000007.old-{os.getpid()}-")
    # The checkpoint folders' names (.step_X.tmp-*, .step_X.old-*), cleaned up the same way.
    assert fnmatch.fnmatch(tmp.name, ".step_*.tmp-*") and fnmatch.fnmatch(old.name, ".step_*.old-*")
    assert temp_path(target) != tmp  # two writes of one target in one process do not collide


def test_stale_temps_of_dead_processes_go_and_live_ones_stay(tmp_path):
    dead, live = dead_pid(), os.getppid()
    stale = [tmp_path / f".out.h5.tmp-{dead}", tmp_path / f".out.h5.tmp-{dead}-3",
             tmp_path / ".out.h5.tmp-k3j_x9a2"]  # a tempfile suffix of older releases: no owner
    stale_dir = tmp_path / f".out.h5.old-{dead}-0"
    kept = [tmp_path / f".out.h5.tmp-{live}-0",  # another process, still running
            tmp_path / f".other.h5.tmp-{dead}",  # another target
            tmp_path / "out.h5.tmp-1"]  # not hidden: not one of our temporaries
    for path in [*stale, *kept]:
        path.write_bytes(b"x" * 1024)
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x")
    removed = remove_stale_temps(tmp_path, "out.h5")
    assert sorted(removed) == sorted(p.absolute() for p in [*stale, stale_dir])
    assert names(tmp_path) == sorted(p.name for p in kept)
    assert remove_stale_temps(tmp_path) == [(tmp_path / f".other.h5.tmp-{dead}").absolute()]


def test_our_own_pid_is_stale_unless_we_are_writing_it(tmp_path):
    """Containers start their command as the same pid every time: a temp named with our pid that
    we are not writing was left by an earlier, killed incarnation."""
    leftover = tmp_path / f".out.h5.tmp-{os.getpid()}-0"
    leftover.write_text("killed run")
    assert is_stale(leftover)
    with atomic_file(tmp_path / "out.h5") as tmp:
        tmp.write_text("now")
        assert not leftover.exists()  # the write removed it first
        assert not is_stale(tmp)
        assert remove_stale_temps(tmp_path) == []  # a write in flight is never removed
    assert names(tmp_path) == ["out.h5"]


def test_a_write_removes_leftovers_of_killed_writers_of_the_same_target(tmp_path):
    dead, live = dead_pid(), os.getppid()
    (tmp_path / f".out.json.tmp-{dead}").write_text("killed")
    (tmp_path / f".out.json.tmp-{live}").write_text("in flight elsewhere")
    with atomic_file(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    assert names(tmp_path) == [f".out.json.tmp-{live}", "out.json"]


def _model() -> AutoModel:
    torch.manual_seed(0)
    return AutoModel.from_config(get_preset("tiny", vocab_size=64))


def test_checkpoint_and_model_saves_remove_leftover_temp_folders(tmp_path):
    dead = dead_pid()
    for name in (f".ckpt.tmp-{dead}-0", f".ckpt.old-{dead}-1", f".m.tmp-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 4096)
    model = _model()
    Checkpoint(model.state_dict(), config=model.config).save(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "m")
    assert names(tmp_path) == ["ckpt", "m"]


def test_a_crash_while_replacing_a_model_folder_keeps_its_tokenizer(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    _model().save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")

    def crash(new: Path, target: Path) -> None:
        raise OSError("killed between writing and renaming")

    monkeypatch.setattr(atomic_module, "_swap_in", crash)
    with pytest.raises(OSError, match="killed between"):
        _model().save_pretrained(folder)
    assert names(folder) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert names(tmp_path) == ["m"]
