"""Preprocessing: each kind's records, malformed inputs, skipping, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from astrai_data import DatasetFactory, load_h5, open_storage
from astrai_data.prepare import PrepareConfig, prepare
from conftest import CharTokenizer, write_jsonl

INLINE = PrepareConfig(num_workers=0)
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]


def _targets(tok, labels, mask):
    """Decoded runs of labels where the mask is on."""
    runs, current = [], []
    for token, on in zip(labels.tolist(), mask.tolist(), strict=True):
        if on:
            current.append(token)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    return runs + ([tok.decode(current, skip_special_tokens=False)] if current else [])


def test_seq_documents_are_encoded_and_separated_by_eos(tmp_path, char_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "ab"}, {"text": "你好"}, "", {"text": "c"}])
    report = prepare("seq", [src], tmp_path / "out.h5", char_tokenizer, INLINE)
    assert (report.records, report.tokens, report.skipped) == (3, 8, 0)
    storage = load_h5(tmp_path / "out.h5", tokenizer=char_tokenizer)
    stream = storage.fetch(0, len(storage))["sequence"].tolist()
    assert stream == [*char_tokenizer.encode("ab"), 0, *char_tokenizer.encode("你好"), 0, 5 + 99, 0]
    info = storage.meta.info
    assert (info["pad_id"], info["eos_id"], info["records"], info["sources"]) == (3, 0, 3, ["in.jsonl"])
    assert storage.meta.tokenizer_fingerprint == char_tokenizer.fingerprint()


def test_worker_processes_write_the_same_file_as_inline(tmp_path, char_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {i} 文档"} for i in range(300)])
    prepare("seq", [src], tmp_path / "a.h5", char_tokenizer, INLINE)
    prepare("seq", [src], tmp_path / "b.h5", char_tokenizer,
            PrepareConfig(num_workers=2, chunk_lines=7, max_in_flight=3))
    a, b = load_h5(tmp_path / "a.h5"), load_h5(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.fetch(0, len(a))["sequence"], b.fetch(0, len(b))["sequence"])


def test_sft_masks_every_assistant_turn_and_nothing_else(tmp_path, char_tokenizer):
    src = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    prepare("sft", [src], tmp_path / "sft.h5", char_tokenizer, INLINE)
    total = len(load_h5(tmp_path / "sft.h5"))
    dataset = DatasetFactory.load("sft", tmp_path / "sft.h5", window_size=total - 1)
    item = dataset[0]  # the whole stream: both chats
    targets = _targets(char_tokenizer, item["labels"], item["loss_mask"])
    assert targets == ["Hello!<|im_end|>", "4.<|im_end|>", "Hello!<|im_end|>"]
    storage = dataset.storage
    full = storage.fetch(0, len(storage))
    masked_out = char_tokenizer.decode(full["sequence"][~full["loss_mask"]], skip_special_tokens=False)
    assert "Be brief." in masked_out and "2+2?" in masked_out and "assistant\n" in masked_out


def test_dpo_masks_cover_the_final_response_only(tmp_path, char_tokenizer):
    rows = [{"prompt": "Q1", "chosen": "good", "rejected": "bad"},
            {"messages": CHAT[:4], "chosen": "4.", "rejected": "5."}]
    prepare("dpo", [write_jsonl(tmp_path / "d.jsonl", rows)], tmp_path / "d.h5", char_tokenizer, INLINE)
    dataset = DatasetFactory.load("dpo", tmp_path / "d.h5")
    first, second = dataset[0], dataset[1]
    assert _targets(char_tokenizer, first["chosen_labels"], first["chosen_loss_mask"]) == ["good<|im_end|>"]
    assert _targets(char_tokenizer, first["rejected_labels"], first["rejected_loss_mask"]) == ["bad<|im_end|>"]
    # The earlier assistant turn ("Hello!") belongs to the prompt: not a target.
    assert _targets(char_tokenizer, second["chosen_labels"], second["chosen_loss_mask"]) == ["4.<|im_end|>"]
    batch = dataset.collate_fn([first, second])
    assert batch["chosen_input_ids"].shape[0] == 2 and batch["chosen_attention_mask"].dtype.is_floating_point is False


def test_grpo_offline_groups_and_rewards(tmp_path, char_tokenizer):
    rows = [{"prompt": "1+1?", "responses": ["2", "3", "two"], "rewards": [1, 0, 0.5]},
            {"prompt": "2+2?", "responses": ["4", "4.", "5"], "rewards": [1.0, 1.0, 0.0]}]
    prepare("grpo", [write_jsonl(tmp_path / "g.jsonl", rows)], tmp_path / "g.h5", char_tokenizer, INLINE)
    dataset = DatasetFactory.load("grpo", tmp_path / "g.h5")
    assert not dataset.online and dataset.group_size == 3 and len(dataset) == 2
    batch = dataset.collate_fn([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[:2] == (2, 3) and batch["rewards"].tolist() == [[1, 0, 0.5], [1, 1, 0]]
    item = dataset[0]
    assert _targets(char_tokenizer, item["labels"][2], item["loss_mask"][2]) == ["two<|im_end|>"]


def test_grpo_online_prompts_keep_their_answers(tmp_path, char_tokenizer):
    rows = [{"prompt": "What is 1 + 2?", "answer": "3"},
            {"messages": [{"role": "user", "content": "2 加 2 等于多少？"}], "answer": 4}]
    prepare("grpo", [write_jsonl(tmp_path / "o.jsonl", rows)], tmp_path / "o.h5", char_tokenizer, INLINE)
    dataset = DatasetFactory.load("grpo", tmp_path / "o.h5")
    assert dataset.online
    item = dataset[1]
    assert (item["answer"], item["lang"], item["prompt"]) == ("4", "zh", "2 加 2 等于多少？")
    want = char_tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True)
    assert item["prompt_ids"].tolist() == want
    assert dataset[0]["lang"] == "en"


MALFORMED = [
    ("seq", "{not json", "invalid JSON"),
    ("seq", '["a list"]', "expected a JSON object, got list"),
    ("seq", '{"txt": "typo"}', "missing field 'text'"),
    ("seq", '{"text": 3}', "field 'text' must be a string, got int"),
    ("seq", '{"text": "   "}', "field 'text' is empty"),
    ("seq", b'{"text": "\xff"}', "not valid UTF-8"),
    ("sft", '{"messages": []}', "field 'messages' is empty"),
    ("sft", '{"messages": "hi"}', "field 'messages' must be a list"),
    ("sft", '{"messages": [{"role": "user"}]}', "messages[0] must be an object with string 'role' and 'content'"),
    ("sft", '{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role is 'bot'"),
    ("sft", '{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ("sft", '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}',
     "messages[0].content is empty"),
    ("dpo", '{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ("dpo", '{"chosen": "a", "rejected": "b"}', "needs exactly one of 'prompt'"),
    ("dpo", '{"prompt": "p", "messages": [], "chosen": "a", "rejected": "b"}', "needs exactly one of"),
    ("dpo", '{"messages": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}',
     "last message of a prompt must be from the user"),
    ("dpo", '{"prompt": "p", "chosen": "", "rejected": "b"}', "field 'chosen' is empty"),
    ("grpo", '{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0], "answer": "1"}', "not both"),
    ("grpo", '{"prompt": "p"}', "not neither"),
    ("grpo", '{"prompt": "p", "responses": ["a", "b"], "rewards": [1]}', "2 responses but 1 rewards"),
    ("grpo", '{"prompt": "p", "responses": ["a", ""], "rewards": [1, 0]}', "responses[1] must be a non-empty string"),
    ("grpo", '{"prompt": "p", "responses": ["a", "b"], "rewards": [1, "x"]}', "rewards[1] must be a finite number"),
    ("grpo", '{"prompt": "p", "responses": ["a", "b"], "rewards": [1, true]}', "rewards[1] must be a finite number"),
    ("grpo", '{"prompt": "p", "answer": ""}', "field 'answer' is empty"),
    ("grpo", '{"prompt": "p", "answer": "1", "lang": "fr"}', "field 'lang' must be 'en' or 'zh'"),
]


def _lines_with(kind: str, bad: str | bytes) -> list[bytes]:
    good = {"seq": {"text": "fine"}, "sft": {"messages": CHAT[1:3]},
            "dpo": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "grpo": {"prompt": "p", "responses": ["a", "b"], "rewards": [1, 0]}}[kind]
    if kind == "grpo" and "answer" in str(bad):
        good = {"prompt": "p", "answer": "1"}
    bad = bad if isinstance(bad, bytes) else bad.encode()
    return [json.dumps(good).encode(), bad, json.dumps(good).encode()]


@pytest.mark.parametrize(("kind", "line", "reason"), MALFORMED)
def test_a_malformed_line_stops_with_file_line_reason(tmp_path, char_tokenizer, kind, line, reason):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(_lines_with(kind, line)) + b"\n")
    out = tmp_path / "out.h5"
    with pytest.raises(ValueError) as info:
        prepare(kind, [src], out, char_tokenizer, INLINE)
    assert str(info.value).startswith(f"{src}:2: ")
    assert reason in str(info.value) and "--skip-invalid" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.parametrize(("kind", "line", "reason"), MALFORMED)
def test_skip_invalid_skips_and_counts_the_line(tmp_path, char_tokenizer, kind, line, reason):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(_lines_with(kind, line)) + b"\n")
    config = PrepareConfig(num_workers=0, skip_invalid=True)
    report = prepare(kind, [src], tmp_path / "out.h5", char_tokenizer, config)
    assert (report.records, report.skipped) == (2, 1)
    assert report.skipped_examples[0].startswith(f"{src}:2: ") and reason in report.skipped_examples[0]
    assert open_storage(tmp_path / "out.h5").meta.info["skipped"] == 1


def test_grpo_group_size_and_mode_are_fixed_by_the_first_valid_line(tmp_path, char_tokenizer):
    rows = ["{oops", {"prompt": "a", "responses": ["1", "2"], "rewards": [1, 0]},
            {"prompt": "b", "responses": ["1", "2", "3"], "rewards": [1, 0, 0]},
            {"prompt": "c", "answer": "3"}]
    src = write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(ValueError, match=r"g.jsonl:1: invalid JSON"):
        prepare("grpo", [src], tmp_path / "g.h5", char_tokenizer, INLINE)
    config = PrepareConfig(num_workers=0, skip_invalid=True)
    report = prepare("grpo", [src], tmp_path / "g.h5", char_tokenizer, config)
    assert (report.records, report.skipped) == (1, 3)
    assert "has 3 responses, but" in report.skipped_examples[1] and "g.jsonl:2 has 2" in report.skipped_examples[1]
    assert "is an online record, but" in report.skipped_examples[2]


def test_errors_name_the_right_file_and_line_across_inputs(tmp_path, char_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}, "", {"text": 1}])
    with pytest.raises(ValueError, match=r"b.jsonl:3: field 'text' must be a string"):
        prepare("seq", [a, b], tmp_path / "o.h5", char_tokenizer, PrepareConfig(num_workers=2, chunk_lines=1))


def test_no_valid_record_is_an_error(tmp_path, char_tokenizer):
    src = write_jsonl(tmp_path / "e.jsonl", ['{"text": ""}'])
    with pytest.raises(ValueError, match="no valid records.*1 invalid lines skipped"):
        prepare("seq", [src], tmp_path / "o.h5", char_tokenizer,
                PrepareConfig(num_workers=0, skip_invalid=True))
    assert not (tmp_path / "o.h5").exists()


def test_bad_arguments_are_explained(tmp_path, char_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such input file"):
        prepare("seq", [tmp_path / "missing.jsonl"], tmp_path / "o.h5", char_tokenizer)
    with pytest.raises(ValueError, match="unknown kind 'ppo'"):
        prepare("ppo", [src], tmp_path / "o.h5", char_tokenizer)
    with pytest.raises(ValueError, match="must end in .h5"):
        prepare("seq", [src], tmp_path / "o.txt", char_tokenizer)
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        prepare("seq", [src], tmp_path / "nope" / "o.h5", char_tokenizer, INLINE)
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        prepare("seq", [src], tmp_path / "o.h5", tmp_path / "no-tokenizer")


class _Interrupting(CharTokenizer):
    """Raises KeyboardInterrupt on its third batch, as Ctrl-C would mid-run."""

    calls = 0

    def encode_batch(self, texts, add_special_tokens=False):
        type(self).calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return super().encode_batch(texts)


def test_an_interrupted_run_leaves_no_output(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    out = tmp_path / "out.h5"
    out.write_text("previous output stays untouched")
    with pytest.raises(KeyboardInterrupt):
        prepare("seq", [src], out, _Interrupting(), PrepareConfig(num_workers=0, chunk_lines=10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.h5"]
    assert out.read_text() == "previous output stays untouched"


def test_tiny_data_can_be_written_as_json(tmp_path, char_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": CHAT}])
    prepare("sft", [src], tmp_path / "out.jsonl", char_tokenizer, INLINE)
    dataset = DatasetFactory.load("sft", tmp_path / "out.jsonl", window_size=20)
    assert dataset.storage.meta.info["records"] == 1 and len(dataset) > 0


# ---- with the real AutoTokenizer (byte-level BPE, ChatML template) ---------------------------

def test_real_tokenizer_sft_masks_each_reply_and_its_end_of_turn(tmp_path, tokenizer_dir):
    from astrai_core.tokenizer import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "3 + 4 = 7."},
            {"role": "user", "content": "狗怎么叫？"}, {"role": "assistant", "content": "狗汪汪叫。"}]
    src = write_jsonl(tmp_path / "sft.jsonl", [{"messages": chat}])
    prepare("sft", [src], tmp_path / "sft.h5", tokenizer_dir, PrepareConfig(num_workers=2))
    total = len(load_h5(tmp_path / "sft.h5"))
    dataset = DatasetFactory.load("sft", tmp_path / "sft.h5", window_size=total - 1, tokenizer=tok)
    item = dataset[0]
    assert _targets(tok, item["labels"], item["loss_mask"]) == ["3 + 4 = 7.<|im_end|>", "狗汪汪叫。<|im_end|>"]
    assert tok.decode(item["input_ids"], skip_special_tokens=False).startswith("<|im_start|>system\n")


def test_real_tokenizer_seq_matches_encode_and_workers(tmp_path, tokenizer_dir):
    from astrai_core.tokenizer import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [f"The sky is blue. {i} + 1 = {i + 1}. 天空是蓝色的。" for i in range(200)]
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    prepare("seq", [src], tmp_path / "p.h5", tokenizer_dir, PrepareConfig(num_workers=2, chunk_lines=16))
    storage = load_h5(tmp_path / "p.h5", tokenizer=tok)
    want = [i for t in texts for i in [*tok.encode(t), tok.eos_id]]
    assert storage.fetch(0, len(storage))["sequence"].tolist() == want
    assert storage.meta.info["tokenizer_path"] == str(tokenizer_dir.resolve())


def test_an_output_path_that_is_a_folder_is_refused(tmp_path, char_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    with pytest.raises(IsADirectoryError, match="--out takes a file path"):
        prepare("seq", [src], tmp_path, char_tokenizer, INLINE)


def test_a_worker_that_cannot_start_reports_its_error(tmp_path):
    from astrai_data.prepare import worker

    worker.init_worker("seq", tmp_path / "missing-tokenizer", None, ignore_sigint=False)
    try:
        with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
            worker.encode_chunk(worker.Chunk(0, 1, [b'{"text": "x"}'], 13))
    finally:
        worker._init_error = None
