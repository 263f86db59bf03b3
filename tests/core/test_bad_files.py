"""A damaged or foreign file is a user error: every command says what is wrong with which file and
how to fix it, in one line (the `astrai` entry point prints USER_ERRORS that way), never a
traceback, and leaves nothing behind.

Covers config.json that is JSON but not an object, dataset files with random bytes written into
them, and truncated or corrupt model.safetensors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from typer.testing import CliRunner

from astrai_core import AutoModel, get_preset
from astrai_core.cli.main import USER_ERRORS, app
from astrai_core.model.weights import read_safetensors_header
from astrai_data import save_h5

runner = CliRunner()
VOCAB = 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|begin_of_text|>"]


def write_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer of VOCAB tokens with the contract's special tokens first."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(VOCAB - 5)])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "pad_token": "<|pad|>"}))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A servable tiny model folder (weights, config, tokenizer)."""
    folder = tmp_path_factory.mktemp("model") / "tiny"
    AutoModel.from_config(get_preset("tiny", vocab_size=VOCAB)).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture
def copy_of(model_dir, tmp_path):
    def copy() -> Path:
        target = tmp_path / "model"
        target.mkdir()
        for item in model_dir.iterdir():
            (target / item.name).write_bytes(item.read_bytes())
        return target
    return copy


@pytest.fixture
def seq_file(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return save_h5(tmp_path / "seq.h5", "seq", {"sequence": rng.integers(5, VOCAB, 4000)},
                   info={"vocab_size": VOCAB})


def assert_user_error(result, *fragments: str) -> str:
    """The command failed with an error the CLI prints as one line, naming what is wrong."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, USER_ERRORS), repr(result.exception)
    message = str(result.exception)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- config.json holding valid JSON that is not an object ---------------------------------


def train_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--strategy", "seq", "--max-steps", "1", "--batch-size", "2", "--max-seq-len", "16",
            "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"astrai"', "null", "7"])
@pytest.mark.parametrize("command", ["model info", "serve", "generate", "train"])
def test_a_config_that_is_not_an_object_is_named_in_one_line(copy_of, seq_file, tmp_path,
                                                             command, content):
    model = copy_of()
    (model / "config.json").write_text(content)
    before = files_under(tmp_path)
    args = {"model info": ["model", "info", str(model)],
            "serve": ["serve", str(model), "--port", "1"],
            "generate": ["generate", str(model), "--prompt", "w1 w2", "--device", "cpu"],
            "train": train_args(model, seq_file, tmp_path / "run")}[command]
    result = runner.invoke(app, args)
    assert_user_error(result, f"{model / 'config.json'}: holds a JSON ",
                      "a model config is a JSON object", "copy the model folder again")
    assert files_under(tmp_path) == before  # no run folder, no launch.json, no temp files


def test_the_entry_point_prints_the_config_error_without_a_traceback(copy_of):
    model = copy_of()
    (model / "config.json").write_text("[1, 2, 3]")
    result = subprocess.run([sys.executable, "-m", "astrai_core.cli.main", "model", "info",
                             str(model)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "holds a JSON array" in result.stderr


# ---- dataset files with random bytes written into them ------------------------------------


def overwrite(path: Path, offset: int, n: int = 64) -> Path:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = random.Random(offset).randbytes(n)
    path.write_bytes(bytes(data))
    return path


def object_header(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        return h5py.h5o.get_info(f[name].id).addr


def first_chunk(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        return f[name].id.get_chunk_info(0).byte_offset


# Each hits another structure: h5py raised KeyError for the first two and nothing at all for the
# third (random ids, which the model then indexed out of range).
DAMAGE = {
    "segment index header": lambda p: object_header(p, "segment_index/sequence"),
    "segment header": lambda p: object_header(p, "streams/sequence/0"),
    "token data": lambda p: first_chunk(p, "streams/sequence/0"),
}


@pytest.mark.parametrize("where", list(DAMAGE))
def test_data_inspect_names_a_damaged_dataset_file(seq_file, where):
    overwrite(seq_file, DAMAGE[where](seq_file))
    result = runner.invoke(app, ["data", "inspect", str(seq_file)])
    assert_user_error(result, f"{seq_file}: not an AstrAI dataset file, or a corrupt one",
                      "prepare it again with `astrai data prepare`")


@pytest.mark.parametrize("where", ["segment index header", "segment header"])
def test_train_names_a_damaged_dataset_file_and_writes_nothing(model_dir, seq_file, tmp_path,
                                                               where):
    overwrite(seq_file, DAMAGE[where](seq_file))
    before = files_under(tmp_path)
    result = runner.invoke(app, train_args(model_dir, seq_file, tmp_path / "run"))
    assert_user_error(result, f"{seq_file}: not an AstrAI dataset file, or a corrupt one",
                      "astrai data prepare")
    assert files_under(tmp_path) == before


def test_damaged_token_data_fails_on_the_first_read(seq_file):
    from astrai_data import load_h5

    overwrite(seq_file, DAMAGE["token data"](seq_file))
    storage = load_h5(seq_file)  # the structure is intact
    with pytest.raises(ValueError, match=r"stream 'sequence' holds id \d+ at token \d+, past "
                                         r"the vocabulary of 64\); prepare it again"):
        storage.fetch(0, 64)


def test_a_damaged_header_attribute_is_named(seq_file):
    from astrai_data import load_h5

    with h5py.File(seq_file, "a") as f:
        f.attrs["keys"] = "[not json"
    with pytest.raises(ValueError, match="header attribute 'keys' is not valid JSON"):
        load_h5(seq_file)
    with h5py.File(seq_file, "a") as f:
        f.attrs["keys"] = '["sequence"]'
        del f.attrs["n_tokens"]
    with pytest.raises(ValueError, match="the header has no 'n_tokens' attribute"):
        load_h5(seq_file)


# ---- truncated, empty or corrupt model.safetensors ----------------------------------------


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


BROKEN_WEIGHTS = {
    "empty": (lambda p: truncate(p, 0), "the file is empty"),
    "shorter than 8 bytes": (lambda p: truncate(p, 5), "5 bytes, fewer than the 8-byte header"),
    "cut inside the header": (lambda p: truncate(p, 100), "the header length says"),
    "cut inside the data": (lambda p: truncate(p, p.stat().st_size - 10),
                            "the tensors need"),
    "header not JSON": (lambda p: overwrite(p, 8, 16), "the header is not valid JSON"),
    "absurd header length": (
        lambda p: p.write_bytes((10**12).to_bytes(8, "little") + p.read_bytes()[8:]),
        "the header length says 1000000000000 bytes"),
}


@pytest.mark.parametrize("case", list(BROKEN_WEIGHTS))
def test_model_info_refuses_damaged_weights(copy_of, case):
    model = copy_of()
    damage, detail = BROKEN_WEIGHTS[case]
    damage(model / "model.safetensors")
    result = runner.invoke(app, ["model", "info", str(model)])
    assert_user_error(result, f"{model / 'model.safetensors'}: not a valid safetensors file",
                      detail, "copy or download it again")


def test_offsets_that_disagree_with_the_shape_are_corrupt(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4)}, str(path))
    raw = path.read_bytes()
    n = header_length(path)
    header = json.loads(raw[8:8 + n])
    header["a"]["shape"] = [3]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(ValueError, match=r"tensor 'a' \(F32, shape \(3,\)\) needs 12 bytes, its "
                                         r"offsets span 16"):
        read_safetensors_header(path)


def test_model_info_counts_parameters_from_the_headers_of_every_shard(tmp_path):
    model = AutoModel.from_config(get_preset("tiny", vocab_size=VOCAB))
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=100_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    result = runner.invoke(app, ["model", "info", str(tmp_path / "sharded")])
    assert result.exit_code == 0, result.output
    assert f"{model.num_parameters():,}" in result.output
    truncate(shards[-1], shards[-1].stat().st_size // 2)
    broken = runner.invoke(app, ["model", "info", str(tmp_path / "sharded")])
    assert_user_error(broken, f"{shards[-1]}: not a valid safetensors file")


def test_an_untied_model_counts_its_head(tmp_path):
    model = AutoModel.from_config(get_preset("tiny", vocab_size=VOCAB, tie_weight=False))
    model.save_pretrained(tmp_path / "m")
    result = runner.invoke(app, ["model", "info", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert f"{model.num_parameters():,}" in result.output
