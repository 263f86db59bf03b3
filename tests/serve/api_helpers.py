"""Helpers for the HTTP API tests: a live uvicorn server in a thread on a random port,
Server-Sent Events and Prometheus parsing, polling, and model folders for the CLI tests."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

HOST = "127.0.0.1"


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread. The socket is bound before
    the thread starts, so the port is known and nobody else can take it."""

    def __init__(self, app: FastAPI, shutdown_timeout: float = 3.0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=shutdown_timeout)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> LiveServer:
        self._thread.start()
        wait_until(lambda: self.server.started, timeout=30, what="uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02,
               what: str = "the condition") -> Any:
    """Poll `predicate` until it is truthy; its value, or AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sse_payloads(lines: list[str]) -> list[Any]:
    """The `data:` payloads of an event stream, JSON-decoded, with "[DONE]" kept as a str."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metrics(url: str) -> dict[str, float]:
    """Prometheus samples of `GET /metrics`, keyed by name plus labels."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def model_folder(dest: Path, hf_folder: Path, tokenizer: Any) -> Path:
    """A servable folder: the tiny Hugging Face llama plus the tiny tokenizer."""
    shutil.copytree(hf_folder, dest)
    tokenizer.save_pretrained(dest)
    return dest


def memorizing_model(tokenizer: Any, text: str, steps: int = 400, seed: int = 0):
    """A tiny Transformer trained until greedy decoding from the first token of `text`
    reproduces all of it: a model whose output is known in advance (e.g. Chinese and emoji
    split across byte-level tokens), so streaming can be checked character by character."""
    import torch

    from astrai_core.model import ModelConfig, Transformer

    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=320, dim=64, n_layers=2, dim_ffn=128, n_heads=4,
                         n_kv_heads=2, max_seq_len=128)
    model = Transformer(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    for _ in range(steps):
        logits = model(x)
        if bool((logits.argmax(-1) == y).all()):
            return model.eval(), ids
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError(f"the model did not learn {text!r} in {steps} steps")


def slow_down(engine: Any, seconds: float = 0.01) -> None:
    """Make every engine step take at least `seconds`, so a request is surely still running
    when a test acts on it."""
    run = engine.scheduler.runner.run

    def slow(batch: Any) -> Any:
        time.sleep(seconds)
        return run(batch)

    engine.scheduler.runner.run = slow
