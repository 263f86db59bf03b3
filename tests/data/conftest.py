"""Fixtures for astrai-data tests: a character-level tokenizer with the contract's special tokens
and ChatML template, and small token-level dataset files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|begin_of_text|>"]
OFFSET = len(SPECIALS)


class CharTokenizer:
    """One id per character (id = 5 + code point); ids 0..4 are the special tokens. Renders
    chats as ChatML: <|im_start|>role\\ncontent<|im_end|>\\n."""

    eos_id, im_start_id, im_end_id, pad_id, bos_id = range(5)
    vocab_size = 65536

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [OFFSET + ord(c) for c in text]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < OFFSET:
                out.append("" if skip_special_tokens else SPECIALS[i])
            else:
                out.append(chr(i - OFFSET))
        return "".join(out)

    def apply_chat_template_with_mask(self, messages):
        ids, mask = [], []
        for m in messages:
            head = [self.im_start_id, *self.encode(m["role"] + "\n")]
            body = [*self.encode(m["content"]), self.im_end_id]
            ids += head + body + self.encode("\n")
            on = int(m["role"] == "assistant")
            mask += [0] * len(head) + [on] * len(body) + [0]
        return ids, mask

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        ids, _ = self.apply_chat_template_with_mask(messages)
        if add_generation_prompt:
            ids += [self.im_start_id, *self.encode("assistant\n")]
        return ids if tokenize else self.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(b"char-tokenizer-v1").hexdigest()


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as they are)."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def stream_tokens() -> np.ndarray:
    return np.arange(5, 1005, dtype=np.int64)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real AutoTokenizer folder: byte-level BPE trained on a small synthetic corpus."""
    from astrai_core.tokenizer import train_tokenizer
    from astrai_data.synth import synthesize

    root = tmp_path_factory.mktemp("tokenizer")
    synthesize(root / "corpus", size=200, seed=0)
    train_tokenizer([root / "corpus" / "pretrain.jsonl", root / "corpus" / "sft.jsonl"], 800,
                    root / "tok", show_progress=False)
    return root / "tok"
