"""AutoTokenizer: round trips, special tokens, Hugging Face folders both ways, SFT masks."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from astrai_core.tokenizer import AutoTokenizer, ChatTemplateError, train_tokenizer

EN = ["the", "cat", "sat", "on", "a", "mat", "while", "small", "models", "learn", "to", "count", "numbers", "and", "write", "words"]
ZH = ["我们", "学习", "数学", "模型", "今天", "天气", "很好", "你好", "世界", "中文", "数字", "计算"]
LLAMA3_SPECIALS = ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "用中文说一遍。"},
    {"role": "assistant", "content": "四十二 😀"},
]


def bilingual_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(EN, k=8)) + f" {rng.randint(0, 999)}." if i % 2 else
            "".join(rng.choices(ZH, k=6)) + f"，共{rng.randint(0, 999)}个。" for i in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(bilingual_lines(2000)), encoding="utf-8")
    train_tokenizer([corpus], 360, root / "tok", show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def tokenizer(folder) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def llama_folder(folder, tmp_path_factory):
    """A Llama-3 style Hugging Face folder: its own special tokens, eos named as an AddedToken
    object, named templates, and generation_config.json listing several eos ids."""
    path = tmp_path_factory.mktemp("llama3")
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens(LLAMA3_SPECIALS)
    (path / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    config = {"bos_token": "<|begin_of_text|>",
              "eos_token": {"content": "<|eot_id|>", "lstrip": False, "special": True},
              "chat_template": [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                {"name": "default", "template": LLAMA3}]}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    eos_ids = [backend.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}), encoding="utf-8")
    return path


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们去公园散步吧。",
    "Mixed 中英文 text: 模型 learns 12345 numbers!",
    "Emoji 😀👍🏽👨‍👩‍👧 and flags 🇨🇳🇬🇧",
    "  runs   of\t\twhitespace \n\n\n  and trailing   ",
    "",
])
def test_encode_decode_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, text]) == [ids, ids]


def test_our_special_tokens_have_fixed_ids_and_roles(tokenizer):
    assert [tokenizer.id_to_token(i) for i in range(5)] == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|begin_of_text|>"]
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id) == (0, 3, 4)
    assert tokenizer.stop_ids == [0, 2]
    assert tokenizer.vocab_size == len(tokenizer) == 360


def test_add_special_tokens_prepends_bos_only_when_asked(tokenizer):
    plain = tokenizer.encode("hello 你好")
    assert tokenizer.encode("hello 你好", add_special_tokens=True) == [4, *plain]
    assert tokenizer.encode_batch(["hi"], add_special_tokens=True)[0][0] == 4


def test_special_tokens_in_text_are_single_ids_and_skipped_on_decode(tokenizer):
    text = "<|im_start|>user\n你好<|im_end|>"
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == "user\n你好"
    assert tokenizer.decode_batch([ids]) == ["user\n你好"]


def test_decode_accepts_tensors(tokenizer):
    ids = tokenizer.encode("模型 model")
    assert tokenizer.decode(torch.tensor(ids)) == "模型 model"


def test_encode_rejects_wrong_input_types(tokenizer):
    with pytest.raises(TypeError, match="encode_batch"):
        tokenizer.encode(["a list"])
    with pytest.raises(TypeError, match="list of str"):
        tokenizer.encode_batch("a string")


def test_save_load_keeps_everything_and_the_fingerprint(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "copy")
    loaded = AutoTokenizer.load(tmp_path / "copy")
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert len(tokenizer.fingerprint()) == 64 and int(tokenizer.fingerprint(), 16) >= 0
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.stop_ids, loaded.bos_id, loaded.pad_id) == (tokenizer.stop_ids, 4, 3)
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and "<|im_start|>" in config["chat_template"]


def test_fingerprint_changes_with_the_vocabulary(tokenizer, folder):
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens(["<|extra|>"])
    assert AutoTokenizer(backend).fingerprint() != tokenizer.fingerprint()


def test_save_into_a_model_folder_keeps_its_files_and_leaves_no_temporaries(tokenizer, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("stale")
    tokenizer.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # overwriting is fine
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["chat_template.jinja", "config.json", "tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "chat_template.jinja").read_text() == tokenizer.chat_template


def test_save_pretrained_to_a_file_path_fails_clearly(tokenizer, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="needs a folder"):
        tokenizer.save_pretrained(tmp_path / "file")


def test_transformers_loads_our_folder_and_agrees(tokenizer, folder):
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Mixed 中英文 text 123 😀"
    assert hf.encode(text) == tokenizer.encode(text, add_special_tokens=True)
    assert hf.decode(tokenizer.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (4, 0, 3)
    chat = MULTI_TURN[:4]
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, tokenize=False)


def test_folder_saved_by_transformers_loads_with_its_chat_template(folder, tmp_path):
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    hf.chat_template = LLAMA3
    hf.save_pretrained(tmp_path)
    ours = AutoTokenizer.from_pretrained(tmp_path)
    assert ours.chat_template == LLAMA3
    assert ours.apply_chat_template(MULTI_TURN, tokenize=False) == hf.apply_chat_template(
        MULTI_TURN, tokenize=False, add_generation_prompt=True)


def test_hugging_face_llama3_folder_stops_on_every_end_of_turn_token(llama_folder):
    tok = AutoTokenizer.from_pretrained(llama_folder)
    eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    assert tok.eos_id == eot and tok.bos_id == 4 and tok.pad_id is None
    assert tok.stop_ids[:2] == [eot, end]  # eos first, then generation_config's ids
    assert set(tok.stop_ids) == {eot, end, 0, 2}  # plus the ChatML end tokens this vocabulary has
    assert tok.chat_template == LLAMA3  # the "default" of the named templates


def test_folder_without_chat_template_falls_back_to_chatml(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.bos_id is None and tok.eos_id == 0  # no names: eos falls back to the first stop token
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_loading_errors_say_what_is_wrong(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        AutoTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="pass the folder"):
        AutoTokenizer.from_pretrained(folder / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json.*astrai tokenizer train"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not be parsed"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_broken_tokenizer_config_is_reported(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config.json is not valid JSON"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ChatTemplateError, match=f"chat template of {tmp_path}.*syntax error"):
        AutoTokenizer.from_pretrained(tmp_path)


def masked_text(tok: AutoTokenizer, ids: list[int], mask: list[int]) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)


def test_sft_mask_covers_replies_and_their_end_token_with_default_template(tokenizer):
    ids, mask = tokenizer.apply_chat_template_with_mask(MULTI_TURN)
    assert ids == tokenizer.apply_chat_template(MULTI_TURN, add_generation_prompt=False)
    assert masked_text(tokenizer, ids, mask) == "42<|im_end|>四十二 😀<|im_end|>"
    first = mask.index(1)  # everything before the first reply is the prompt the model sees
    assert tokenizer.decode(ids[:first], skip_special_tokens=False) == \
        tokenizer.apply_chat_template(MULTI_TURN[:2], tokenize=False)
    assert tokenizer.decode(ids[-2:], skip_special_tokens=False) == "<|im_end|>\n"
    assert mask[-2:] == [1, 0]  # the end-of-turn token is trained, the separator after it is not


def test_sft_mask_with_llama3_template(llama_folder):
    tok = AutoTokenizer.from_pretrained(llama_folder)
    ids, mask = tok.apply_chat_template_with_mask(MULTI_TURN)
    assert ids == tok.apply_chat_template(MULTI_TURN, add_generation_prompt=False)
    assert masked_text(tok, ids, mask) == "42<|eot_id|>四十二 😀<|eot_id|>"
    assert sum(1 for a, b in zip([0, *mask], mask, strict=False) if (a, b) == (0, 1)) == 2


def test_sft_mask_with_system_prompt_and_tools(tokenizer):
    chat = [{"role": "user", "content": "add 2 and 3"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
            {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}]
    tools = [{"name": "add", "parameters": {"type": "object"}}]
    ids, mask = tokenizer.apply_chat_template_with_mask(chat, tools=tools, system_prompt="Use tools.")
    assert masked_text(tokenizer, ids, mask) == \
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>5<|im_end|>'
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nUse tools.\n\n# Tools")


def test_sft_mask_refuses_templates_that_rewrite_earlier_turns(folder):
    tok = AutoTokenizer.from_pretrained(folder)  # a private copy: the template is changed below
    # Marks the last message differently from earlier ones, so prefixes are not prefixes of the whole.
    tok.set_chat_template("{% for m in messages %}{{ m.content }}{{ '.' if loop.last else ',' }}{% endfor %}")
    with pytest.raises(ValueError, match="not prefix-stable at message 2"):
        tok.apply_chat_template_with_mask(MULTI_TURN)
    with pytest.raises(ValueError, match="at least one message"):
        tok.apply_chat_template_with_mask([])
