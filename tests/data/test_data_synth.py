"""The synthetic bilingual corpus: determinism, the held-out split, content and rewards."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from astrai_data.synth import (
    VERIFIABLE_TASKS,
    exact_answer_reward,
    extract_answer,
    format_reward,
    synthesize,
    task_spec,
)
from astrai_data.synth.corpus import TASKS
from astrai_data.synth.tasks import held_out_key

TRAIN_FILES = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "grpo.jsonl")


def _rows(folder, name):
    return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    synthesize(folder, size=400, seed=3)
    return folder


def _user_prompts(rows):
    for row in rows:
        if "prompt" in row:
            yield row["prompt"]
        for message in row.get("messages", []):
            if message["role"] == "user":
                yield message["content"]


def test_same_seed_same_bytes_other_seed_other_corpus(corpus, tmp_path):
    synthesize(tmp_path / "again", size=400, seed=3)
    synthesize(tmp_path / "other", size=400, seed=4)
    for name in (*TRAIN_FILES, "eval_sft.jsonl", "eval_dpo.jsonl", "eval_grpo.jsonl", "manifest.json"):
        assert (tmp_path / "again" / name).read_bytes() == (corpus / name).read_bytes()
    assert (tmp_path / "other" / "sft.jsonl").read_bytes() != (corpus / "sft.jsonl").read_bytes()


def test_size_scales_every_file(tmp_path):
    small = synthesize(tmp_path / "s", size=100, seed=0)
    big = synthesize(tmp_path / "b", size=300, seed=0)
    assert small.records["sft.jsonl"] == 100 and big.records["sft.jsonl"] == 300
    assert big.records["pretrain.jsonl"] == 3 * small.records["pretrain.jsonl"]
    with pytest.raises(ValueError, match="--corpus-size must be a positive"):
        synthesize(tmp_path / "z", size=0)


def test_default_size_is_a_quickstart_sized_corpus(tmp_path):
    report = synthesize(tmp_path / "d", seed=0)
    assert 1_000_000 < report.bytes["pretrain.jsonl"] < 3_000_000
    assert report.records["sft.jsonl"] == 2000


def test_held_out_prompts_never_appear_in_training_files(corpus):
    train_prompts = {p for name in TRAIN_FILES for p in _user_prompts(_rows(corpus, name))}
    pretrain = "\n".join(row["text"] for row in _rows(corpus, "pretrain.jsonl"))
    eval_prompts = set(_user_prompts(_rows(corpus, "eval_sft.jsonl")))
    eval_prompts |= {row["prompt"] for row in _rows(corpus, "eval_grpo.jsonl")}
    eval_prompts |= {row["prompt"] for row in _rows(corpus, "eval_dpo.jsonl")}
    assert len(eval_prompts) > 30
    assert not eval_prompts & train_prompts
    for prompt in eval_prompts:  # nor as a sentence of the pretraining text
        assert not re.search(r"(?<!\w)" + re.escape(prompt), pretrain), prompt


@pytest.mark.parametrize("name", ["eval_sft.jsonl", "eval_dpo.jsonl", "eval_grpo.jsonl"])
def test_each_held_out_file_has_300_distinct_items_per_language_over_every_task(corpus, name):
    """Large enough that a 5-point difference is not noise (at 60%, one standard error of a
    300-item accuracy is 2.8 points), each question once, and every task measured."""
    rows = _rows(corpus, name)
    for lang in ("en", "zh"):
        mine = [r for r in rows if r["lang"] == lang]
        questions = [json.dumps(r.get("messages", r.get("prompt"))[:1] if "messages" in r
                                else r["prompt"], ensure_ascii=False) for r in mine]
        assert len(mine) == 300 and len(set(questions)) == 300, (lang, len(set(questions)))
        tasks = Counter(r["task"] for r in mine)
        wanted = VERIFIABLE_TASKS if name == "eval_grpo.jsonl" else tuple(TASKS)
        assert set(tasks) == set(wanted)
        # Evenly spread: a task short of held-out questions gives all it has, no task more
        # than an even share of what is left.
        assert max(tasks.values()) <= -(-300 // len(wanted)) * 2


def test_dpo_held_out_pairs_prefer_the_reference_reply(corpus):
    for row in _rows(corpus, "eval_dpo.jsonl"):
        task = TASKS[row["task"]]
        assert row["chosen"] != row["rejected"]
        assert row["chosen"] in {task.reply(k, row["lang"]) for k in task.split_keys("eval")}


def test_held_out_equations_are_never_taught(corpus):
    arithmetic = TASKS["arithmetic"]
    held_out = [k for k in arithmetic.instances() if held_out_key(k)]
    assert 0.08 < len(held_out) / len(arithmetic.instances()) < 0.2
    train_text = "\n".join((corpus / name).read_text(encoding="utf-8") for name in TRAIN_FILES)
    for key in held_out:
        for lang in ("en", "zh"):
            assert not re.search(r"(?<!\d)" + re.escape(arithmetic.reply(key, lang)), train_text)


def test_eval_grpo_prompts_are_held_out_and_answers_are_right(corpus):
    rows = _rows(corpus, "eval_grpo.jsonl")
    assert {row["lang"] for row in rows} == {"en", "zh"}
    for row in rows:
        numbers = [int(n) for n in re.findall(r"\d+", row["prompt"])]
        if row["task"] == "arithmetic":
            a, b = numbers
            op = "+" if re.search(r"\+|plus|加", row["prompt"]) else "-"
            assert held_out_key((a, op, b))
            assert int(row["answer"]) == (a + b if op == "+" else a - b)
        elif row["task"] == "compare":
            assert int(row["answer"]) == max(numbers)
        elif row["task"] == "count":
            start, end = numbers
            assert held_out_key((start, end))
            assert row["answer"] == " ".join(str(n) for n in range(start, end + 1))


def test_canonical_replies_earn_full_rewards(corpus):
    checked = 0
    for row in _rows(corpus, "sft.jsonl") + _rows(corpus, "eval_sft.jsonl"):
        for m in row["messages"]:
            match = re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)\.", m["content"])
            if m["role"] == "assistant" and match:
                a, op, b, c = match.groups()
                assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
                assert exact_answer_reward(m["content"], c, "en") == format_reward(m["content"], "en") == 1
                checked += 1
    assert checked > 50


def test_dpo_pairs_differ_and_cover_every_rejection_style(corpus):
    rows = _rows(corpus, "dpo.jsonl")
    assert all(row["chosen"] != row["rejected"] for row in rows)
    zh = re.compile(r"[\u4e00-\u9fff]")
    wrong_language = sum(bool(zh.search(r["chosen"])) != bool(zh.search(r["rejected"])) for r in rows)
    dont_know = sum(r["rejected"] in ("I don't know.", "我不知道。") for r in rows)
    assert wrong_language > 0.1 * len(rows) and dont_know > 0
    assert any("messages" in r for r in rows) and any("prompt" in r for r in rows)


def test_both_languages_and_every_task_are_present(corpus):
    tasks = {row["task"] for row in _rows(corpus, "eval_sft.jsonl")}
    assert tasks == set(TASKS)
    text = (corpus / "sft.jsonl").read_text(encoding="utf-8")
    assert "A dog says woof." in text or "狗汪汪叫。" in text
    assert "你好！有什么可以帮你的？" in text


def test_vocabulary_is_small(corpus):
    text = "\n".join((corpus / name).read_text(encoding="utf-8") for name in TRAIN_FILES)
    words = set(re.findall(r"[A-Za-z']+", text))
    chars = set(re.findall(r"[\u4e00-\u9fff]", text))
    assert len(words) < 300 and len(chars) < 300


def test_extract_answer_reads_the_first_sentence():
    assert extract_answer("3 + 4 = 7.") == "7"
    assert extract_answer("3 加 4 等于 7。然后 8 加 1 等于 9。", "zh") == "7"
    assert extract_answer("The bigger number is 12. 5") == "12"
    assert extract_answer("  7 后面是 8。") == "8"
    assert extract_answer("I don't know.") is None


def test_rewards_check_the_answer_and_the_format():
    item = {"prompt": "What is 3 + 4?", "answer": "7", "lang": "en"}
    assert exact_answer_reward("3 + 4 = 7.", item["answer"], item["lang"]) == 1.0
    assert exact_answer_reward("3 + 4 = 8.", item["answer"], item["lang"]) == 0.0
    assert format_reward("3 + 4 = 8.", item["lang"]) == 1.0
    assert format_reward("3 加 4 等于 7。", item["lang"]) == 0.0  # wrong language
    assert format_reward("3 + 4 = 7. Also 1 + 1 = 2.", item["lang"]) == 0.0
    assert format_reward("更大的数是 12。", "zh") == 1.0
    with pytest.raises(ValueError, match="lang must be"):
        format_reward("x", "fr")


def test_counting_is_rewarded_for_the_whole_sequence_only():
    """A count's answer is every number in order: stopping early, running on, skipping one or
    repeating one all score 0, where the last number alone would score 1 for some of them."""
    answer = "3 4 5 6"
    assert exact_answer_reward("3, 4, 5, 6.", answer, "en") == 1.0
    assert exact_answer_reward("3、4、5、6。", answer, "zh") == 1.0
    for wrong in ("3, 4, 5.", "3, 4, 5, 6, 7.", "3, 4, 6.", "3, 4, 5, 5, 6.", "2, 3, 4, 5, 6."):
        assert exact_answer_reward(wrong, answer, "en") == 0.0, wrong
    assert exact_answer_reward("3, 4, 5, 6, ", answer, "en") == 1.0  # the numbers are right...
    assert format_reward("3, 4, 5, 6, ", "en") == 0.0  # ...the format reward catches the cut
    assert format_reward("3, 4, 5, 6.", "en") == format_reward("3、4、5、6。", "zh") == 1.0
    assert format_reward("3、4、5、6。", "en") == 0.0


def test_canonical_count_replies_earn_full_rewards(corpus):
    rows = [r for r in _rows(corpus, "grpo.jsonl") if r["task"] == "count"]
    assert rows
    for row in rows:
        start, end = (int(n) for n in re.findall(r"\d+", row["prompt"]))
        reply = TASKS["count"].reply((start, end), row["lang"])
        assert exact_answer_reward(reply, row["answer"], row["lang"]) == 1.0
        assert format_reward(reply, row["lang"]) == 1.0


def test_task_spec_describes_every_task():
    spec = task_spec()
    assert set(TASKS) <= set(spec)
    assert spec["arithmetic"]["numeric"] and spec["arithmetic"]["held_out"] == "keys"
    assert spec["color"]["held_out"] == "question templates"
