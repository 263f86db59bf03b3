"""`astrai eval` end to end: a harness task over local files (English and Chinese) on two model
folders side by side, its accuracy per language equal to a hand computation from the models'
log-likelihoods; results.json with every number and the settings; progress over requests; and
the one-line failures (no lm-eval, data not on this machine, unknown task, results in the way)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from eval_helpers import (
    MC_RECORDS,
    continuation_logprob,
    make_model_dir,
    train_tokenizer,
    write_mc_task,
)
from typer.testing import CliRunner

from astrai_core import AutoModel, AutoTokenizer
from astrai_core.cli.main import app

runner = CliRunner()
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is the eval extra: uv sync (dev) or pip install 'astrai-train[eval]'")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-cli")
    tok = train_tokenizer(root)
    models = [make_model_dir(root / name, tok, seed) for name, seed in (("a", 1), ("b", 2))]
    return root, models, write_mc_task(root / "task")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An empty Hugging Face cache: whatever a test needs from it, it does not have."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))


def _eval(*args: str):
    return runner.invoke(app, ["eval", *args], catch_exceptions=True)


def hand_accuracy(folder) -> dict[str, float]:
    """lm-eval's multiple_choice acc, by hand: context = the question, each choice scored as
    " choice" after it, the argmax of the summed log-probabilities against the answer."""
    model = AutoModel.from_pretrained(folder, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hits: dict[str, list[float]] = {"en": [], "zh": []}
    for record in MC_RECORDS:
        context = tokenizer.encode(record["question"])
        scores = []
        for choice in record["choices"]:
            whole = tokenizer.encode(record["question"] + " " + choice)
            scores.append(continuation_logprob(model, context, whole[len(context):])[0])
        best = max(range(len(scores)), key=lambda i: scores[i])
        hits[record["lang"]].append(float(best == record["answer"]))
    out = {lang: sum(v) / len(v) for lang, v in hits.items()}
    out["all"] = sum(sum(v) for v in hits.values()) / len(MC_RECORDS)
    return out


@needs_lm_eval
@pytest.mark.slow
def test_a_local_bilingual_task_runs_end_to_end_on_two_models(setup, tmp_path):
    _, models, task = setup
    out = tmp_path / "results"
    result = _eval(*map(str, models), "--tasks", str(task), "--out", str(out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in report["models"]] == ["a", "b"]
    for model, folder in zip(report["models"], models, strict=True):
        acc = {s["lang"]: s["value"] for s in model["scores"]
               if s["task"] == "bilingual_mc" and s["metric"] == "acc"}
        assert acc == pytest.approx(hand_accuracy(folder), abs=1e-12)
        # every number lm-eval reported is kept, with its sample counts
        raw = model["raw"][str(task)]
        assert raw["results"]["bilingual_mc"]["acc,none"] == acc["all"]
        assert raw["n-samples"]["bilingual_mc"]["effective"] == len(MC_RECORDS)
        assert model["info"]["parameters"] > 0 and model["seconds"][str(task)] > 0
    settings = report["settings"]
    assert settings["tasks"] == [str(task)] and settings["models"] == [str(m) for m in models]
    assert {"device", "dtype", "seed", "limit", "num_fewshot", "hardware", "versions"} <= set(settings)
    assert settings["versions"]["lm-eval"]
    # one table, rows task/metric/language, one column per model
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| task | metric | lang | a | b |"
    assert [row.split(" | ")[2] for row in table[2:]] == ["all", "en", "zh"]
    assert "bilingual_mc" in result.output and "results.json" in result.output


@needs_lm_eval
def test_progress_is_shown_over_requests_and_can_be_turned_off(setup, tmp_path):
    _, models, task = setup
    shown = _eval(str(models[0]), "--tasks", str(task), "--out", str(tmp_path / "1"),
                  "--scoring", "model")
    assert shown.exit_code == 0, shown.output
    requests = 4 * len(MC_RECORDS)
    assert f"a: loglikelihood: {requests}/{requests} requests in" in shown.output
    quiet = _eval(str(models[0]), "--tasks", str(task), "--out", str(tmp_path / "2"),
                  "--no-progress")
    assert quiet.exit_code == 0 and "requests in" not in quiet.output
    # both ways of scoring give one accuracy
    accs = [json.loads((tmp_path / d / "results.json").read_text())["models"][0]["scores"][0]
            for d in ("1", "2")]
    assert accs[0]["value"] == accs[1]["value"]


def test_without_the_extra_harness_tasks_say_how_to_install_it(setup, tmp_path, monkeypatch,
                                                               capsys):
    _, models, _ = setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.setattr(sys, "argv", ["astrai", "eval", str(models[0]), "--tasks", "mmlu",
                                      "--out", str(tmp_path / "out")])
    from astrai_core.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--tasks mmlu" in err and "pip install 'astrai-train[eval]'" in err
    assert not (tmp_path / "out").exists()


@needs_lm_eval
def test_a_task_whose_data_is_not_here_fails_before_any_model_loads(setup, tmp_path):
    _, models, _ = setup
    task = tmp_path / "hub_task.yaml"
    task.write_text("task: from_the_hub\ndataset_path: someone/not-downloaded\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\n"
                    "doc_to_choice: c\ndoc_to_target: 0\n")
    result = _eval(str(models[0]), "--tasks", str(task), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0
    message = str(result.exception)
    assert "'someone/not-downloaded' is not on this machine" in message
    assert "never downloads" in message and "HF_HOME" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_an_unknown_path_or_results_in_the_way_fail_with_one_line(setup, tmp_path):
    _, models, _ = setup
    result = _eval(str(models[0]), "--tasks", "ppl:missing.jsonl", "--out", str(tmp_path))
    assert isinstance(result.exception, FileNotFoundError)
    assert "missing.jsonl: file not found" in str(result.exception)
    (tmp_path / "results.json").write_text("{}")
    result = _eval(str(models[0]), "--tasks", "ppl:missing.jsonl", "--out", str(tmp_path))
    assert isinstance(result.exception, FileExistsError)
    assert "--overwrite" in str(result.exception)
    assert (tmp_path / "results.json").read_text() == "{}"
    result = _eval(str(tmp_path / "nope"), "--tasks", "ppl:x.txt", "--out", str(tmp_path / "o"))
    assert "model folder not found" in str(result.exception)


@needs_lm_eval
def test_an_unknown_task_name_says_what_a_task_can_be(setup, tmp_path, monkeypatch):
    from astrai_train.evaluation import harness

    class NoTasks:  # lm-eval's index of its ~200 task folders takes seconds to build
        def __init__(self, **_):
            pass

        def load(self, specs):
            raise KeyError(specs[0])

    monkeypatch.setattr("lm_eval.tasks.TaskManager", NoTasks)
    tasks = harness.HarnessTasks(["no_such_task"])
    with pytest.raises(ValueError, match="not an lm-eval task, a task YAML.*lm-eval ls tasks"):
        tasks.prepare()
