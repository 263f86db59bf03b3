"""`astrai data prepare|synth|inspect` and interrupted runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from astrai_core.cli.main import app
from astrai_data import load_h5
from conftest import write_jsonl

runner = CliRunner()


def test_data_group_is_registered():
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0
    for command in ("prepare", "synth", "inspect"):
        assert command in result.output


def test_prepare_then_inspect_shows_counts_and_a_masked_example(tmp_path, tokenizer_dir):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": chat}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": chat}, "{broken"])
    out = tmp_path / "sft.h5"
    result = runner.invoke(app, ["data", "prepare", "--strategy", "sft", "--tokenizer", str(tokenizer_dir),
                                 "--input", str(a), str(b), "--out", str(out), "--skip-invalid",
                                 "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    assert "4 records" in result.output and "skipped 1 invalid lines" in result.output
    assert "b.jsonl:2: invalid JSON" in result.output
    shown = runner.invoke(app, ["data", "inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    for text in ("sft", "sequence, loss_mask", "records", "4", "[[ ]] marks"):
        assert text in shown.output
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!<|im_end|>]]" in shown.output


def test_inspect_without_a_tokenizer_lists_ids(tmp_path, char_tokenizer):
    from astrai_data.prepare import PrepareConfig, prepare

    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    prepare("dpo", [src], tmp_path / "d.h5", char_tokenizer, PrepareConfig(num_workers=0))
    shown = runner.invoke(app, ["data", "inspect", str(tmp_path / "d.h5")])
    assert shown.exit_code == 0, shown.output
    assert "record 0, chosen" in shown.output and "[[102 2]]" in shown.output
    assert "pass --tokenizer DIR to decode" in shown.output


def test_prepare_reports_a_malformed_line_and_writes_nothing(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "ok"}, {"text": ""}])
    out = tmp_path / "o.h5"
    result = runner.invoke(app, ["data", "prepare", "--strategy", "seq", "--tokenizer", str(tokenizer_dir),
                                 "-i", str(src), "-o", str(out), "--num-workers", "0"])
    assert isinstance(result.exception, ValueError)
    assert str(result.exception).startswith(f"{src}:2: field 'text' is empty")
    assert not out.exists()


def test_synth_writes_the_corpus(tmp_path):
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "c"), "--corpus-size", "40"])
    assert result.exit_code == 0, result.output
    assert "sft.jsonl" in result.output and "eval_grpo.jsonl" in result.output
    assert len((tmp_path / "c" / "sft.jsonl").read_text().splitlines()) == 40


def test_user_errors_print_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "astrai_core.cli.main", "data", "inspect",
                             str(tmp_path / "missing.h5")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "missing.h5: no such dataset file" in result.stderr and "Traceback" not in result.stderr


SLOW_PREPARE = textwrap.dedent("""
    import signal, sys, time
    # A shell that starts jobs in the background hands its children SIGINT ignored, and Python
    # then never raises KeyboardInterrupt: restore what a terminal gives.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from conftest import CharTokenizer
    from astrai_data.cli import _exit_on_sigterm
    from astrai_data.prepare import PrepareConfig, prepare

    class Slow(CharTokenizer):
        def encode_batch(self, texts, add_special_tokens=False):
            time.sleep(0.05)
            return super().encode_batch(texts)

    print("started", flush=True)
    with _exit_on_sigterm():
        prepare("seq", [{src!r}], {out!r}, Slow(), PrepareConfig(num_workers=2, chunk_lines=4))
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_killed_run_with_workers_leaves_no_output(tmp_path, sig):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"document {i}"} for i in range(4000)])
    out = tmp_path / "out.h5"
    script = SLOW_PREPARE.format(tests=os.path.dirname(__file__), src=str(src), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(1.5)  # well into the run (it needs about 25 s)
    assert proc.poll() is None
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_synth_output_prepares_without_invalid_lines(tmp_path, char_tokenizer):
    from astrai_data.prepare import PrepareConfig, prepare
    from astrai_data.synth import synthesize

    synthesize(tmp_path / "c", size=30, seed=1)
    config = PrepareConfig(num_workers=0)
    for kind, name in [("seq", "pretrain"), ("sft", "sft"), ("dpo", "dpo"), ("grpo", "grpo"),
                       ("sft", "eval_sft"), ("grpo", "eval_grpo"), ("seq", "eval_pretrain")]:
        report = prepare(kind, [tmp_path / "c" / f"{name}.jsonl"], tmp_path / f"{name}.h5",
                         char_tokenizer, config)
        assert report.skipped == 0 and report.records == len(
            (tmp_path / "c" / f"{name}.jsonl").read_text().splitlines())
    assert load_h5(tmp_path / "grpo.h5").meta.info["grpo_mode"] == "online"
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["size"] == 30
