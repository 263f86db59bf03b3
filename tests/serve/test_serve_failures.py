"""Failure paths found by probing the server, each ending in one clear answer: a request that can
never fit, requests that outlive the shutdown timeout, max_tokens beyond the context window, the
auth scheme's case, and a lone surrogate in the text."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from api_helpers import HOST, LiveServer, slow_down, sse_payloads, wait_until
from constrained_helpers import WINDOW, random_model, served

from astrai_serve import InferenceEngine
from astrai_serve.api import ServerConfig, create_app
from astrai_serve.api.server import DrainingServer

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model():
    return random_model(seed=1)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with served(model, tokenizer) as (engine, url):
        yield engine, url


def test_a_request_that_can_never_fit_is_a_400_that_says_why(model, tokenizer):
    with InferenceEngine(model, tokenizer, max_batch_size=64) as engine, \
            LiveServer(create_app(engine, ServerConfig(max_waiting=256))) as live:
        body = {"prompt": ["hi"] * 21, "n": 16, "max_tokens": 1}
        response = httpx.post(f"{live.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "too_many_sequences" and error["param"] == "n"
        assert "336 sequences" in error["message"] and "at most 320" in error["message"]
        assert "retry-after" not in response.headers
        fits = httpx.post(f"{live.url}/v1/completions", timeout=120,
                          json={**body, "prompt": ["hi"] * 20})
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 320


class ThreadServer:
    """`DrainingServer` (what `astrai serve` runs) in a thread, logging to the root logger."""

    def __init__(self, app, grace_s: float) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.url = f"http://{HOST}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None, log_level="info",
                                timeout_graceful_shutdown=grace_s)
        self.server = DrainingServer(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30, what="uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def test_requests_that_outlive_the_shutdown_timeout_end_cleanly(model, tokenizer, caplog):
    caplog.set_level(logging.INFO)
    long = {"messages": USER, "max_tokens": 900, "ignore_eos": True}
    results: dict[str, object] = {}
    with InferenceEngine(model, tokenizer) as engine:
        slow_down(engine, 0.02)
        with ThreadServer(create_app(engine), grace_s=2.0) as live:
            chat = f"{live.url}/v1/chat/completions"

            def stream(name: str) -> None:
                with httpx.stream("POST", chat, json={**long, "stream": True},
                                  timeout=60) as response:
                    results[name] = sse_payloads(list(response.iter_lines()))

            def whole() -> None:
                results["whole"] = httpx.post(chat, json=long, timeout=60)

            threads = [threading.Thread(target=f, args=a) for f, a in
                       ((stream, ("s1",)), (stream, ("s2",)), (whole, ()))]
            for t in threads:
                t.start()
            wait_until(lambda: engine.get_stats()["running"] == 3, what="3 running requests")
            started = time.monotonic()
            live.server.should_exit = True
            for t in threads:
                t.join(30)
            assert time.monotonic() - started < 10
    for name in ("s1", "s2"):
        events = results[name]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "aborted", events[-3:]
        assert "shutting down" in events[-2]["error"]["message"]
        assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-2])
    response = results["whole"]
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "aborted"
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "Exception in ASGI application" not in log and "Cancel" not in log, log


def test_max_tokens_beyond_the_window_is_lowered_and_said_in_usage(server, tokenizer):
    url = server[1]
    prompt = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    body = {"messages": USER, "max_tokens": 2**64, "temperature": 0, "stop": ["\n", " "]}
    usage = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["usage"]
    assert usage["completion_tokens_limit"] == WINDOW - len(prompt)
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        events = sse_payloads(list(response.iter_lines()))
    assert events[-2]["usage"]["completion_tokens_limit"] == WINDOW - len(prompt)
    fits = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": USER, "max_tokens": 3}).json()["usage"]
    assert fits.get("completion_tokens_limit") is None
    prompts = ["a", "a much longer prompt than the other one"]
    many = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": prompts, "max_tokens": 10**30, "stop": ["e"]}).json()["usage"]
    assert many["completion_tokens_limit"] == WINDOW - len(tokenizer.encode(prompts[1]))


def test_the_auth_scheme_is_case_insensitive(model, tokenizer):
    with served(model, tokenizer, api_key="s3cret") as (_, url):
        body = {"messages": USER, "max_tokens": 1}
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR  s3cret"):
            response = httpx.post(f"{url}/v1/chat/completions", json=body,
                                  headers={"Authorization": header}, timeout=60)
            assert response.status_code == 200, (header, response.text)
        for header in ("Basic s3cret", "bearer S3CRET", "bearers3cret", "s3cret"):
            response = httpx.post(f"{url}/v1/chat/completions", json=body,
                                  headers={"Authorization": header}, timeout=60)
            assert response.status_code == 401, header
        assert httpx.get(f"{url}/").status_code == 200  # the page asks for the key itself


@pytest.mark.parametrize(("path", "raw", "param"), [
    ("chat/completions", b'{"messages": [{"role": "user", "content": "ab\\ud83dcd"}]}',
     "messages.0.content"),
    ("chat/completions", b'{"messages": [{"role": "system", "content": "ok"}, {"role": "user", '
     b'"content": [{"type": "text", "text": "x\\udc00"}]}]}', "messages.1.content.0.text"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
     b'"function", "function": {"name": "f", "description": "\\ud800"}}]}',
     "tools.0.function.description"),
    ("completions", b'{"prompt": ["fine", "half \\ud83d"]}', "prompt.1"),
])
def test_a_lone_surrogate_is_a_400_that_says_what_is_wrong(server, path, raw, param):
    response = httpx.post(f"{server[1]}/v1/{path}", content=raw, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_text"
    assert "lone surrogate (U+D" in error["message"] and "TextInputSequence" not in error["message"]
