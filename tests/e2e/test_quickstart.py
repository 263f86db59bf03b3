"""`astrai quickstart` end to end at tiny scale: every stage runs, the table has both languages,
the final folder serves, a re-run reproduces the table, and bad settings fail clearly."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from astrai_core import AutoModel, AutoTokenizer
from astrai_core.cli.main import app

pytest.importorskip("astrai_serve")  # the quickstart's GRPO stage samples through the engine

runner = CliRunner()
TINY = ["--preset", "tiny", "--corpus-size", "40", "--steps-scale", "0.02", "--eval-limit", "8",
        "--no-progress"]


def run_quickstart(out: Path, *extra: str):
    return runner.invoke(app, ["quickstart", "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "run"
    result = run_quickstart(out)
    assert result.exit_code == 0, result.output
    assert f"astrai serve {out / 'final'}" in result.output.replace("\n", "")
    return out


def test_every_stage_is_evaluated_in_both_languages(first_run):
    results = json.loads((first_run / "results.json").read_text())
    rows = {m["stage"]: m for m in results["metrics"]}
    assert list(rows) == ["init", "pretrain", "sft", "dpo", "grpo"]
    # The random initial weights: only what needs no generated reply.
    assert set(rows["init"]["loss"]) == set(rows["init"]["preference"]) == {"en", "zh"}
    assert rows["init"]["accuracy"] == rows["init"]["reward"] == {}
    for row in list(rows.values())[1:]:
        for metric in ("loss", "accuracy", "preference", "reward"):
            assert set(row[metric]) == {"en", "zh"}, (row["stage"], metric)
        assert all(0.0 <= v <= 1.0 for v in [*row["accuracy"].values(), *row["preference"].values()])
        assert set(row["tasks"]) == {"en", "zh"}
    # DPO's margin is measured against the SFT model, so it is 0 for the SFT model itself.
    assert rows["sft"]["margin"] == {"en": 0.0, "zh": 0.0} and set(rows["dpo"]["margin"]) == {"en", "zh"}
    assert set(results["seconds"]) >= {"corpus", "tokenizer", "pretrain", "grpo", "evaluation"}
    assert {s["lang"] for s in results["samples"]} == {"en", "zh"}


def test_the_learning_curves_are_one_png_next_to_the_results(first_run):
    pytest.importorskip("matplotlib")
    results = json.loads((first_run / "results.json").read_text())
    curves = first_run / "curves.png"
    assert results["curves"] == str(curves) and curves.read_bytes()[:4] == b"\x89PNG"


def test_each_stage_keeps_a_resumable_checkpoint(first_run):
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        steps = sorted((first_run / stage).glob("step_*"))
        assert steps and (steps[-1] / "optimizer.safetensors").is_file(), stage
        assert (first_run / stage / "launch.json").is_file()


def test_dpo_trains_on_the_sft_models_own_wrong_replies_too(first_run):
    """The DPO file: the corpus's pairs plus, for prompts the SFT model got wrong in a sample,
    the chosen reply against that wrong reply."""
    def records(name: str) -> list[dict]:
        lines = (first_run / "data" / name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    original, on_policy = records("dpo.jsonl"), records("dpo_on_policy.jsonl")
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    added = Counter(map(key, on_policy)) - Counter(map(key, original))
    assert Counter(map(key, original)) <= Counter(map(key, on_policy))  # every pair kept
    added = [json.loads(k) for k in added.elements()]
    assert added and len(on_policy) == len(original) + len(added)  # tiny models err often
    chosen = {r["chosen"] for r in original}
    assert all(r["chosen"] in chosen and r["rejected"] != r["chosen"] for r in added)
    assert (first_run / "data" / "dpo_on_policy.h5").is_file()
    launch = json.loads((first_run / "dpo" / "launch.json").read_text())
    assert "dpo_on_policy.h5" in json.dumps(launch)


def test_final_folder_is_servable(first_run):
    from astrai_serve import InferenceEngine

    final = first_run / "final"
    assert not (final / "optimizer.safetensors").exists()
    model = AutoModel.from_pretrained(final, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(final)
    with InferenceEngine(model, tokenizer, max_batch_size=2, kv_cache_tokens=2048) as engine:
        reply = engine.generate("What is 2 plus 3?", max_tokens=4, temperature=0.0)
    assert isinstance(reply, str)


def test_rerun_reuses_the_finished_run(first_run):
    before = json.loads((first_run / "results.json").read_text())["metrics"]
    result = run_quickstart(first_run)
    assert result.exit_code == 0, result.output
    assert json.loads((first_run / "results.json").read_text())["metrics"] == before


@pytest.mark.slow
def test_same_seed_reproduces_the_table(first_run, tmp_path):
    result = run_quickstart(tmp_path / "again")
    assert result.exit_code == 0, result.output
    fresh = json.loads((tmp_path / "again" / "results.json").read_text())["metrics"]
    assert fresh == json.loads((first_run / "results.json").read_text())["metrics"]


def test_other_settings_in_the_same_folder_are_refused(first_run):
    result = run_quickstart(first_run, "--seed", "7")
    assert isinstance(result.exception, FileExistsError)
    assert "other settings (seed)" in str(result.exception) and "--overwrite" in str(result.exception)


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_quickstart(tmp_path)
    assert isinstance(result.exception, FileExistsError)
    assert "not a quickstart folder" in str(result.exception)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_steps_scale_is_refused(tmp_path):
    result = run_quickstart(tmp_path / "x", "--steps-scale", "0")
    assert isinstance(result.exception, ValueError)
    assert "--steps-scale must be > 0" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_without_astrai_serve_the_error_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "astrai_serve", None)
    result = run_quickstart(tmp_path / "run")
    assert isinstance(result.exception, ImportError)
    assert "astrai-train[rl]" in str(result.exception)
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_an_interrupted_run_says_how_to_continue(monkeypatch, tmp_path):
    import astrai_train.quickstart.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_quickstart", interrupted)
    result = run_quickstart(tmp_path / "run")
    assert result.exit_code == 75  # stopped cleanly: as `astrai train`, a scheduler may requeue
    assert "run the same command again to continue" in result.output
