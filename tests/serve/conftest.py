"""Fixtures for astrai-serve tests: a tiny Hugging Face llama folder (written by transformers in
a temp folder), the same weights loaded by AstrAI, and a tiny byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serve_helpers import EOS_ID, VOCAB

from astrai_core.model import AutoModel, Transformer

transformers = pytest.importorskip("transformers")

HF_FIELDS = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
    # Wide weights: greedy outputs vary token to token instead of repeating one near-tied argmax.
    initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=EOS_ID,
    pad_token_id=3,
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Paged attention keeps the KV cache in fixed-size pages. ",
    "Continuous batching mixes decode and prefill tokens in one step. ",
    "小模型也可以在普通电脑上运行。中文和英文都可以。 ",
    "Numbers like 12345 and 678 are split into digits. ",
]


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_FIELDS)).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_model(hf_folder: Path):
    return transformers.LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def model(hf_folder: Path) -> Transformer:
    return AutoModel.from_pretrained(hf_folder)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from astrai_core.tokenizer import AutoTokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20) + "\n", encoding="utf-8")
    train_tokenizer([corpus], 300, root / "tok", min_frequency=2, held_out=[],
                    show_progress=False)
    tok = AutoTokenizer.from_pretrained(root / "tok")
    assert tok.vocab_size <= VOCAB and tok.eos_id == EOS_ID
    return tok
