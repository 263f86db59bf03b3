"""On-policy preference pairs (`astrai_train.rl.pairs`, `astrai rl pairs`): the policy's most
frequent wrong sample becomes the rejected reply, right samples never do, the file is the same
every run for a seed, and bad input fails with one line before any model loads."""

from __future__ import annotations

import json

import pytest
from eval_helpers import make_model_dir, train_tokenizer
from typer.testing import CliRunner

from astrai_core import AutoModel, AutoTokenizer
from astrai_core.cli.main import app
from astrai_train.rl import pairs as pairs_module
from astrai_train.rl.pairs import PairConfig, on_policy_pairs, reward_judge, same_reply

runner = CliRunner()
RECORDS = [
    {"prompt": "The capital of France is", "chosen": "Paris.", "rejected": "I don't know."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "二加三等于"}], "chosen": "五。", "rejected": "八。",
     "lang": "zh"},
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    folder = make_model_dir(root / "model", train_tokenizer(root), seed=3)
    return folder, AutoModel.from_pretrained(folder, dtype="float32"), AutoTokenizer.from_pretrained(folder)


def fixed_samples(monkeypatch, texts: list[str]) -> None:
    monkeypatch.setattr(pairs_module, "_sample", lambda serve, model, tok, prompts, cfg: texts)


def test_the_most_frequent_wrong_sample_is_rejected_and_right_ones_never_are(policy, monkeypatch):
    _, model, tok = policy
    # record 1: two "Rome." beat one "Berlin."; record 2: every sample is the chosen reply
    fixed_samples(monkeypatch, ["Berlin.", "Rome.", " Paris. ", "Rome.", "五。", "五。", "五。", "五。"])
    out, report = on_policy_pairs(model, tok, RECORDS, PairConfig(samples=4))
    assert out == [RECORDS[0], {**RECORDS[0], "rejected": "Rome."}, RECORDS[1]]
    assert (report.prompts, report.samples, report.wrong_samples, report.on_policy,
            report.records) == (2, 8, 3, 1, 3)
    assert "1 of 2 prompts (50%)" in report.summary()
    # --replace: the on-policy pair alone; a prompt with no wrong sample keeps its own pair
    out, _ = on_policy_pairs(model, tok, RECORDS, PairConfig(samples=4, keep_original=False))
    assert out == [{**RECORDS[0], "rejected": "Rome."}, RECORDS[1]]
    # ties go to the earliest sample; empty samples are not replies
    fixed_samples(monkeypatch, ["", "Rome.", "Berlin.", "Lyon.", "五。", "", "", ""])
    out, report = on_policy_pairs(model, tok, RECORDS, PairConfig(samples=4, keep_original=False))
    assert out[0]["rejected"] == "Rome." and out[1] == RECORDS[1] and report.wrong_samples == 3


def test_a_reward_judge_accepts_what_scores_as_well_as_the_chosen_reply(policy, monkeypatch):
    _, model, tok = policy

    def ends_with_period(prompt, response, **record):
        assert record.get("lang", "zh") == "zh"  # the record's own fields reach it
        return float(response.endswith((".", "。")))

    fixed_samples(monkeypatch, ["Rome.", "Rome", "Lyon.", "x", "六。", "六。", "五。", "五。"])
    out, report = on_policy_pairs(model, tok, RECORDS, PairConfig(samples=4, keep_original=False),
                                  judge=reward_judge(ends_with_period))
    # "Rome." and "六。" end with a period as the chosen replies do: right by this reward
    assert [r["rejected"] for r in out] == ["Rome", "八。"] and report.on_policy == 1
    assert same_reply(RECORDS[0], " Paris.\n") and not same_reply(RECORDS[0], "paris.")


def test_sampled_pairs_are_the_same_every_run_and_come_from_the_policy(policy):
    _, model, tok = policy
    config = PairConfig(samples=3, max_new_tokens=6, seed=11)
    model.train()
    first, report = on_policy_pairs(model, tok, RECORDS, config)
    again, _ = on_policy_pairs(model, tok, RECORDS, config)
    other, _ = on_policy_pairs(model, tok, RECORDS, PairConfig(samples=3, max_new_tokens=6, seed=12))
    assert first == again and first != other
    # random weights never say the chosen reply: every prompt gets an on-policy pair
    assert report.on_policy == 2 and len(first) == 4
    assert model.training  # sampled in eval mode, then restored
    for original, new in zip(first[::2], first[1::2], strict=True):
        assert original in RECORDS and new["chosen"] == original["chosen"]
        assert new["rejected"] not in (original["chosen"], original["rejected"])


def test_bad_settings_fail_with_what_to_change():
    with pytest.raises(ValueError, match="samples must be >= 1"):
        PairConfig(samples=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        PairConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        PairConfig(top_p=1.5)


def test_cli_writes_the_pairs_and_refuses_bad_input_before_loading_a_model(policy, tmp_path):
    folder, _, _ = policy
    data = tmp_path / "dpo.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS),
                    encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    args = ["rl", "pairs", str(folder), "--data", str(data), "--out", str(out),
            "--samples", "2", "--max-tokens", "6"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "2 of 2 prompts" in result.output and str(out) in result.output
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(written) == 4 and written[0] == RECORDS[0]

    before = out.read_bytes()
    refused = runner.invoke(app, args)
    assert isinstance(refused.exception, FileExistsError) and "--overwrite" in str(refused.exception)
    assert out.read_bytes() == before

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps({"prompt": "x", "chosen": "y"})
                   + "\n", encoding="utf-8")
    failed = runner.invoke(app, ["rl", "pairs", str(tmp_path / "no-model"), "--data", str(bad),
                                 "--out", str(tmp_path / "o.jsonl")])
    message = str(failed.exception)
    # the record is checked first: the missing model folder is not what it reports
    assert isinstance(failed.exception, ValueError)
    assert f"{bad}:3: missing field 'rejected'" in message and "\n" not in message
    assert not (tmp_path / "o.jsonl").exists()
    notjson = tmp_path / "notjson.jsonl"
    notjson.write_text("{oops\n", encoding="utf-8")
    failed = runner.invoke(app, ["rl", "pairs", str(folder), "--data", str(notjson),
                                 "--out", str(tmp_path / "o.jsonl")])
    assert f"{notjson}:1: not JSON" in str(failed.exception)
    missing = runner.invoke(app, ["rl", "pairs", str(folder), "--data", str(tmp_path / "none.jsonl"),
                                  "--out", str(tmp_path / "o.jsonl")])
    assert isinstance(missing.exception, FileNotFoundError)
    assert "preference file not found" in str(missing.exception)


def test_a_prompt_longer_than_the_window_is_named_before_sampling(policy):
    _, model, tok = policy
    long = {"prompt": "Cats and dogs are animals. " * 60, "chosen": "Yes.", "rejected": "No."}
    with pytest.raises(ValueError, match=r"record 2: its prompt is \d+ tokens, the model's window 128"):
        on_policy_pairs(model, tok, [RECORDS[0], long], PairConfig(samples=2))
