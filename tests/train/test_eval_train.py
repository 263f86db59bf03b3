"""`astrai train --eval-every N --eval-tasks ...`: the scores of the live model land in
metrics.jsonl every N steps and equal a hand computation on that step's checkpoint; a bad task
stops the run before its first step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_helpers import continuation_logprob
from typer.testing import CliRunner

from astrai_core import AutoModel, AutoTokenizer
from astrai_core.cli.main import app
from astrai_train import TrainConfig
from tolerances import forward_bound

runner = CliRunner()
TEXTS = [{"text": "w5 w6 w7 w8 w9 w10", "lang": "en"}, {"text": "w40 w41 w42 w7", "lang": "zh"}]


@pytest.fixture
def base_args(seq_file, tokenizer_dir, tmp_path) -> list[str]:
    return ["train", "--strategy", "seq", "--data", str(seq_file), "--out", str(tmp_path / "run"),
            "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--max-seq-len", "16",
            "--batch-size", "2", "--no-progress", "--device", "cpu", "--scheduler", "constant",
            "--learning-rate", "0.01"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
    return path


@pytest.mark.slow
def test_scores_are_logged_every_n_steps_and_match_the_checkpoint_of_that_step(
        base_args, text_file, tmp_path):
    result = runner.invoke(app, [*base_args, "--max-steps", "4", "--ckpt-interval", "2",
                                 "--keep-last", "0", "--eval-every", "2",
                                 "--eval-tasks", f"ppl:{text_file}"], catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("loss" in r for r in records if r not in evals)  # the loss lines are untouched
    for record in evals:
        ckpt = tmp_path / "run" / f"step_{record['step']:08d}"
        model = AutoModel.from_pretrained(ckpt, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        for lang in ("all", "en", "zh"):
            texts = [t["text"] for t in TEXTS if lang in ("all", t["lang"])]
            nll = bound = 0.0
            n = 0
            for text in texts:
                tokens = tokenizer.encode(text)
                logp, _, scale = continuation_logprob(model, [tokenizer.eos_id], tokens)
                nll -= logp
                n += len(tokens)
                bound += 2 * len(tokens) * forward_bound(2, 176, scale, torch.float32)
            got = record[f"eval/ppl:{text_file.name}/ppl/{lang}"]
            # log ppl = NLL / n, so its error is the NLL's divided by n
            assert abs(math.log(got) - nll / n) <= bound / n
    # the weights moved between the two evaluations, and so did the score
    assert evals[0][f"eval/ppl:{text_file.name}/ppl/all"] != \
        evals[1][f"eval/ppl:{text_file.name}/ppl/all"]


def test_a_bad_eval_task_stops_the_run_before_its_first_step(base_args, tmp_path):
    result = runner.invoke(app, [*base_args, "--max-steps", "2", "--eval-every", "1",
                                 "--eval-tasks", f"ppl:{tmp_path / 'missing.jsonl'}"],
                           catch_exceptions=True)
    assert isinstance(result.exception, FileNotFoundError)
    assert "missing.jsonl: file not found" in str(result.exception)
    assert not list((tmp_path / "run").glob("step_*"))


def test_eval_every_needs_tasks():
    with pytest.raises(ValueError, match="--eval-every.*needs tasks: add --eval-tasks"):
        TrainConfig(eval_every=10)
    assert TrainConfig(eval_every=10, eval_tasks="ppl:x.jsonl").eval_every == 10
