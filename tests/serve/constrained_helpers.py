"""Helpers for the structured-output, tool-call and scoring tests: a random-weight model with a
window long enough for tool definitions, and a live server around it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from api_helpers import LiveServer
from serve_helpers import VOCAB

from astrai_core.model import ModelConfig, Transformer
from astrai_serve import InferenceEngine
from astrai_serve.api import ServerConfig, create_app

WINDOW = 1024  # tool definitions through the tiny byte-level tokenizer take ~400 tokens
N_LAYERS, DIM = 2, 64


def random_model(seed: int = 0, max_seq_len: int = WINDOW) -> Transformer:
    """A tiny Transformer with random weights: it knows nothing, so whatever structure its
    output has comes from the grammar."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=N_LAYERS, dim_ffn=128, n_heads=4,
                         n_kv_heads=2, max_seq_len=max_seq_len)
    return Transformer(config).eval()


@contextlib.contextmanager
def served(model: Any, tokenizer: Any, **config: Any) -> Iterator[tuple[InferenceEngine, str]]:
    with InferenceEngine(model, tokenizer, page_size=16, max_batch_size=16) as engine, \
            LiveServer(create_app(engine, ServerConfig(served_model_name="tiny", **config))) \
            as server:
        yield engine, server.url


def openai_client(url: str, api_key: str = "unused") -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def trained_to_answer(prompt: list[int], answer: list[int], steps: int = 600,
                      seed: int = 0) -> Transformer:
    """A tiny Transformer trained until greedy decoding after `prompt` gives `answer` (a model
    whose reply is known in advance, e.g. a tool call it chooses on its own)."""
    model = random_model(seed).train()
    ids = torch.tensor([prompt + answer])
    x, y = ids[:, :-1], ids[:, 1:]
    start = len(prompt) - 1  # positions that predict the answer
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model(x)[:, start:]
        if bool((logits.argmax(-1) == y[:, start:]).all()):
            return model.eval()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, start:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError(f"the model did not learn its answer in {steps} steps")
