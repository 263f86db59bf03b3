"""train_tokenizer and `astrai tokenizer train|encode` on a small bilingual corpus made here."""

from __future__ import annotations

import io
import json
import random
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from astrai_core.cli.main import app
from astrai_core.tokenizer import SPECIAL_TOKENS, AutoTokenizer, train_tokenizer
from astrai_core.tokenizer.training import language_of

EN = ["the", "cat", "sat", "on", "a", "mat", "while", "small", "models", "learn", "to", "count", "numbers", "and", "write", "words"]
ZH = ["我们", "学习", "数学", "模型", "今天", "天气", "很好", "你好", "世界", "中文", "数字", "计算"]
VOCAB = 360
runner = CliRunner()


def bilingual_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 3 == 0:
            lines.append("".join(rng.choices(ZH, k=5)) + f"，共{rng.randint(0, 99999)}个。")
        elif i % 3 == 1:
            lines.append(" ".join(rng.choices(EN, k=8)) + f" {rng.randint(0, 99999)} + {rng.randint(0, 99)}.")
        else:  # Chinese and English touching, to check they are not merged together
            lines.append(f"{rng.choice(ZH)}{rng.choice(EN)}{rng.choice(ZH)} {rng.choice(EN)}")
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "bilingual.txt"
    path.write_text("\n".join(bilingual_lines(3000)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "tok"
    report = train_tokenizer([corpus], VOCAB, out, show_progress=False)
    return report, AutoTokenizer.from_pretrained(out)


def test_vocabulary_has_the_requested_size_and_special_tokens_first(trained):
    report, tok = trained
    assert report.vocab_size == tok.vocab_size == VOCAB
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_special_tokens_round_trip(trained):
    _, tok = trained
    text = "".join(SPECIAL_TOKENS) + "user\n你好 hello"
    ids = tok.encode(text)
    assert ids[:5] == [0, 1, 2, 3, 4]
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_every_digit_is_its_own_token(trained):
    _, tok = trained
    digit_ids = [tok.token_to_id(str(d)) for d in range(10)]
    assert None not in digit_ids
    assert tok.encode("9876543210") == [digit_ids[int(d)] for d in "9876543210"]
    for token_id in range(tok.vocab_size):  # no learned token glues a digit to anything
        piece = tok.decode([token_id], skip_special_tokens=False)
        assert not (re.search(r"\d", piece) and len(piece) > 1), piece
    # The same number tokenizes the same way wherever it appears.
    assert tok.encode("共12345个")[-6:-1] == tok.encode("x 12345")[-5:]


def test_chinese_is_never_glued_to_latin_letters(trained):
    _, tok = trained
    for token_id in range(len(SPECIAL_TOKENS), tok.vocab_size):
        piece = tok.decode([token_id])
        assert not (re.search(r"[A-Za-z]", piece) and re.search(r"[^\x00-\x7f]", piece)), piece
    assert len(tok.encode("学习")) < len("学习".encode())  # yet Chinese words do get merged


def test_chinese_characters_are_their_own_tokens_in_every_phrasing(trained):
    _, tok = trained
    for text in ("樱桃是什么颜色？", "樱桃的颜色是什么？", "我有 12 个 apples"):
        pieces = [tok.decode([i]) for i in tok.encode(text)]
        assert all(sum("\u4e00" <= ch <= "\u9fff" for ch in piece) <= 1 for piece in pieces), pieces
    # A character tokenizes the same way in any phrasing (what lets a model read new ones).
    assert tok.encode("樱桃")[0] in tok.encode("樱桃的颜色是什么？")


def test_compression_is_reported_per_language(trained):
    report, _ = trained
    assert set(report.compression) == {"Chinese", "English"}
    assert report.held_out_texts == 60 and report.train_texts == 3000 - 60
    # Chinese characters are never merged with each other: one token per character.
    assert report.compression["English"] > 2.0 and report.compression["Chinese"] == pytest.approx(1.0, abs=0.05)


def test_explicit_held_out_texts_are_used_instead_of_a_split(corpus, tmp_path):
    held = ["hello world", "你好世界", "12345"]
    report = train_tokenizer([corpus], VOCAB, tmp_path / "t", held_out=held, show_progress=False)
    assert report.held_out_texts == 3 and report.train_texts == 3000
    assert set(report.compression) == {"Chinese", "English"}


def test_training_is_deterministic(corpus, tmp_path, trained):
    report = train_tokenizer([corpus], VOCAB, tmp_path / "again", show_progress=False)
    again = (report.out_dir / "tokenizer.json").read_text()
    assert again == (trained[0].out_dir / "tokenizer.json").read_text()


def test_jsonl_text_and_messages_are_read(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": line} for line in bilingual_lines(600)]
    rows += [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hello 123"}]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    report = train_tokenizer([path], 300, tmp_path / "t", held_out_every=0, show_progress=False)
    assert report.train_texts == 601 and report.held_out_texts == 0


def test_progress_is_shown(corpus, tmp_path):
    out = io.StringIO()
    train_tokenizer([corpus], 300, tmp_path / "t", console=Console(file=out, force_terminal=True, width=100))
    assert "computing merges" in out.getvalue()


@pytest.mark.parametrize(("setup", "kwargs", "error", "message"), [
    ("none", {"files": []}, ValueError, "no input files"),
    ("none", {"files": ["missing.txt"]}, FileNotFoundError, r"not found: .*missing.txt"),
    ("dir", {}, IsADirectoryError, "not files"),
    ("ok", {"vocab_size": 100}, ValueError, "too small.*at least 262"),
    ("ok", {"min_frequency": 0}, ValueError, "min_frequency"),
    ("empty", {}, ValueError, "no training text"),
    ("latin1", {}, ValueError, r"a.txt:2 is not UTF-8"),
    ("badjson", {}, ValueError, r"a.jsonl:1 is not valid JSON"),
    ("nofield", {}, ValueError, r"a.jsonl:1: expected an object with a 'text'"),
])
def test_user_errors_are_clear(tmp_path, setup, kwargs, error, message):
    files = {"ok": ("a.txt", "hello 你好\n".encode()), "empty": ("a.txt", b"\n  \n"),
             "latin1": ("a.txt", "fine\ncaf\xe9\n".encode("latin-1")),
             "badjson": ("a.jsonl", b"{oops\n"), "nofield": ("a.jsonl", b'{"body": "x"}\n')}
    if setup in files:
        name, data = files[setup]
        (tmp_path / name).write_bytes(data)
        kwargs = {"files": [tmp_path / name], **kwargs}
    elif setup == "dir":
        kwargs = {"files": [tmp_path]}
    else:
        kwargs = {**kwargs, "files": [tmp_path / f for f in kwargs["files"]]}
    arguments = {"vocab_size": 300, "out_dir": tmp_path / "out", "show_progress": False, **kwargs}
    with pytest.raises(error, match=message):
        train_tokenizer(**arguments)


def test_existing_tokenizer_is_not_overwritten_without_permission(corpus, trained):
    out = trained[0].out_dir
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_tokenizer([corpus], VOCAB, out, show_progress=False)


@pytest.mark.parametrize(("text", "language"), [
    ("hello world", "English"), ("你好世界", "Chinese"), ("模型很好 ok", "Chinese"), ("模型 model", "English"), ("123 ...", None)])
def test_language_of(text, language):
    assert language_of(text) == language


def test_cli_train_then_encode(corpus, tmp_path):
    out = tmp_path / "cli_tok"
    result = runner.invoke(app, ["tokenizer", "train", "--input", str(corpus), str(corpus),
                                 "--vocab-size", "300", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Chinese characters/token" in result.output and "English characters/token" in result.output
    assert "5,880" in result.output  # both inputs read: 2 x 3000 texts minus 2 x 60 held out
    encoded = runner.invoke(app, ["tokenizer", "encode", str(out), "共12个"])
    assert encoded.exit_code == 0, encoded.output
    tok = AutoTokenizer.from_pretrained(out)
    for token_id in tok.encode("共12个"):
        assert f" {token_id} " in encoded.output
    assert "tokens, 4 characters" in encoded.output


def test_cli_encode_with_chat_template_and_special_tokens(trained):
    out = str(trained[0].out_dir)
    result = runner.invoke(app, ["tokenizer", "encode", out, "hi", "--chat", "--add-special-tokens"])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>" in result.output and "<|begin_of_text|>" in result.output


def test_cli_warns_when_the_corpus_is_too_small_for_the_vocabulary(tmp_path):
    (tmp_path / "tiny.txt").write_text("ab ab ab\n", encoding="utf-8")
    result = runner.invoke(app, ["tokenizer", "train", "-i", str(tmp_path / "tiny.txt"), "--vocab-size", "5000",
                                 "--out", str(tmp_path / "t"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "smaller --vocab-size" in result.output


def test_cli_missing_input_is_a_user_error(tmp_path):
    result = runner.invoke(app, ["tokenizer", "train", "--input", str(tmp_path / "nope.txt"),
                                 "--out", str(tmp_path / "t")])
    assert isinstance(result.exception, FileNotFoundError)
    assert "nope.txt" in str(result.exception)
