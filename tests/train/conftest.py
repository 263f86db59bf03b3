"""Fixtures for astrai-train tests: small prepared dataset files of every kind
(written with astrai-data, read back through DatasetFactory), a tokenizer folder and a
TrainConfig factory with quiet, fast defaults."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from train_helpers import VOCAB

from astrai_data import DatasetFactory, save_h5
from astrai_train import TrainConfig


@pytest.fixture
def seq_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return save_h5(tmp_path / "seq.h5", "seq", {"sequence": rng.integers(5, VOCAB, 4000)})


@pytest.fixture
def seq_dataset(seq_file: Path) -> Any:
    return DatasetFactory.load("seq", seq_file, window_size=16)


def _records(rng: np.random.Generator, n: int, prompt: int, response: tuple[int, int]):
    """n prompt+response sequences with masks on the responses."""
    seqs, masks = [], []
    for _ in range(n):
        r = int(rng.integers(*response))
        seqs.append(rng.integers(5, VOCAB, prompt + r))
        masks.append(np.r_[np.zeros(prompt, bool), np.ones(r, bool)])
    return seqs, masks


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    mask = rng.random(4000) < 0.5
    return save_h5(tmp_path / "sft.h5", "sft",
                   {"sequence": rng.integers(5, VOCAB, 4000), "loss_mask": mask})


@pytest.fixture
def dpo_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    n = 16
    chosen, chosen_mask = _records(rng, n, 4, (3, 7))
    rejected, rejected_mask = _records(rng, n, 4, (3, 7))
    streams = {"chosen": chosen, "chosen_mask": chosen_mask,
               "rejected": rejected, "rejected_mask": rejected_mask}
    records = {"chosen_lengths": np.array([len(s) for s in chosen]),
               "rejected_lengths": np.array([len(s) for s in rejected])}
    return save_h5(tmp_path / "dpo.h5", "dpo", streams, records=records)


@pytest.fixture
def grpo_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    n, g = 8, 4
    seqs, masks = _records(rng, n * g, 4, (3, 7))
    lengths = np.array([len(s) for s in seqs]).reshape(n, g)
    rewards = rng.random((n, g)).astype(np.float32)
    return save_h5(tmp_path / "grpo.h5", "grpo", {"sequence": seqs, "loss_mask": masks},
                   records={"lengths": lengths, "rewards": rewards},
                   info={"grpo_mode": "offline"})


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    """A word-level tokenizer of VOCAB tokens, with the contract's special tokens first."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|begin_of_text|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - 5)])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = Whitespace()
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "pad_token": "<|pad|>"}))
    return folder


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., TrainConfig]:
    """TrainConfig with quiet, fast test defaults; keyword arguments override."""

    def make(**overrides: Any) -> TrainConfig:
        defaults = dict(batch_size=2, learning_rate=1e-3, out=str(tmp_path / "out"),
                        ckpt_interval=1000, progress=False, device="cpu",
                        scheduler="constant", seed=0)
        return TrainConfig(**{**defaults, **overrides})

    return make
