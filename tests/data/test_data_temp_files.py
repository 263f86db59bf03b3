"""Leftovers of killed writers: `kill -9` cannot be cleaned up after, so the next write to the
same dataset or corpus file removes the temporaries whose process is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from astrai_core.cli.main import app
from astrai_data.synth import synthesize
from conftest import write_jsonl

runner = CliRunner()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_prepare_removes_temp_files_of_killed_runs_and_keeps_running_ones(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"document {i}"} for i in range(20)])
    dead, live = dead_pid(), os.getppid()
    for name in (f".out.h5.tmp-{dead}", f".out.h5.tmp-{dead}-0"):
        (tmp_path / name).write_bytes(b"\0" * 8192)  # what `kill -9` of a prepare leaves
    (tmp_path / f".out.h5.tmp-{live}-0").write_bytes(b"\0")  # a prepare still running
    result = runner.invoke(app, ["data", "prepare", "--strategy", "seq", "--tokenizer",
                                 str(tokenizer_dir), "-i", str(src), "-o",
                                 str(tmp_path / "out.h5"), "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    assert hidden(tmp_path) == [f".out.h5.tmp-{live}-0"]
    assert (tmp_path / "out.h5").is_file()


def test_synth_removes_temp_files_of_a_killed_run(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    dead = dead_pid()
    (out / f".sft.jsonl.tmp-{dead}").write_text('{"messages": [')
    synthesize(out, size=20)
    assert hidden(out) == []


KILLABLE_PREPARE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import CharTokenizer
    from astrai_data.prepare import PrepareConfig, prepare

    class Slow(CharTokenizer):
        def encode_batch(self, texts, add_special_tokens=False):
            print("writing", flush=True)
            time.sleep(0.2)
            return super().encode_batch(texts)

    prepare("seq", [{src!r}], {out!r}, Slow(), PrepareConfig(num_workers=0, chunk_lines=4))
""")


@pytest.mark.slow
def test_a_prepare_after_kill_9_removes_what_the_killed_one_left(tmp_path, char_tokenizer):
    from astrai_data.prepare import PrepareConfig, prepare

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"document {i}"} for i in range(400)])
    out = tmp_path / "out.h5"
    script = KILLABLE_PREPARE.format(tests=os.path.dirname(__file__), src=str(src), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = hidden(tmp_path)  # no one could clean up
    assert len(left) == 1 and left[0].startswith(f".out.h5.tmp-{proc.pid}-"), left
    prepare("seq", [src], out, char_tokenizer, PrepareConfig(num_workers=0))
    assert hidden(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.h5"]
