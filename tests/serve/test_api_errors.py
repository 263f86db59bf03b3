"""Bad input and failure paths: OpenAI error bodies with the right status (400, 401, 404, 413,
503 + Retry-After), never a 500; /health while loading, after a failed load and after the engine
died."""

from __future__ import annotations

import threading

import httpx
import pytest
from api_helpers import LiveServer, slow_down, wait_until

from astrai_serve import ContextLengthError, InferenceEngine
from astrai_serve.api import ServerConfig, create_app

USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    with InferenceEngine(model, tokenizer, page_size=4, max_batch_size=8) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with LiveServer(create_app(engine, ServerConfig(served_model_name="tiny",
                                                    max_body_bytes=64 * 1024))) as server:
        yield server.url


def assert_error(response: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


CHAT_400 = {
    "empty messages": ({"messages": []}, "messages"),
    "no messages": ({}, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    "user without content": ({"messages": [{"role": "user"}]}, "messages.0"),
    "image content": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages.0"),
    "negative temperature": ({"messages": USER, "temperature": -0.5}, "temperature"),
    "max_tokens 0": ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    "max_completion_tokens -1": ({"messages": USER, "max_completion_tokens": -1},
                                 "max_completion_tokens"),
    "top_p 0": ({"messages": USER, "top_p": 0}, "top_p"),
    "top_p above 1": ({"messages": USER, "top_p": 1.5}, "top_p"),
    "n 0": ({"messages": USER, "n": 0}, "n"),
    "n too many": ({"messages": USER, "n": 1000}, "n"),
    "penalty out of range": ({"messages": USER, "presence_penalty": 3}, "presence_penalty"),
    "empty stop": ({"messages": USER, "stop": [""]}, "stop.0"),
    "top_logprobs alone": ({"messages": USER, "top_logprobs": 2}, None),
    "too many top_logprobs": ({"messages": USER, "logprobs": True, "top_logprobs": 21},
                              "top_logprobs"),
    "seed out of range": ({"messages": USER, "seed": 2**70}, "seed"),
    "string for a number": ({"messages": USER, "temperature": "hot"}, "temperature"),
    "tool_choice not among the tools": ({"messages": USER, "tool_choice": {
        "type": "function", "function": {"name": "g"}},
        "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    "unknown response_format": ({"messages": USER, "response_format": {"type": "yaml"}},
                                "response_format"),
    "logit_bias": ({"messages": USER, "logit_bias": {"5": 10}}, "logit_bias"),
    "prompt too long": ({"messages": [{"role": "user", "content": "fox " * 400}]}, "messages"),
}


@pytest.mark.parametrize("case", list(CHAT_400))
def test_invalid_chat_requests_get_400_naming_the_field(url, case):
    body, param = CHAT_400[case]
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    error = assert_error(response, 400)
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param), error


COMPLETION_400 = {
    "empty string": ({"prompt": ""}, "prompt"),
    "empty list": ({"prompt": []}, "prompt"),
    "empty id list": ({"prompt": [[]]}, "prompt"),
    "token id beyond the vocabulary": ({"prompt": [5, 6, 100000]}, "prompt"),
    "negative token id": ({"prompt": [5, -1]}, "prompt"),
    "max_tokens 0 without echo": ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    "suffix": ({"prompt": "hi", "suffix": "end"}, "suffix"),
    "best_of above n": ({"prompt": "hi", "best_of": 3}, "best_of"),
    "too many logprobs": ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    "prompt too long": ({"prompt": list(range(5, 300))}, "prompt"),
}


@pytest.mark.parametrize("case", list(COMPLETION_400))
def test_invalid_completion_requests_get_400_naming_the_field(url, case):
    body, param = COMPLETION_400[case]
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    error = assert_error(response, 400)
    assert error["param"] == param or error["param"].startswith(param), error


def test_prompt_over_the_window_is_a_context_length_error(url, engine):
    prompt = list(range(5, 300))
    response = httpx.post(f"{url}/v1/completions", json={"prompt": prompt})
    message = assert_error(response, 400, "prompt", "context_length_exceeded")["message"]
    assert "context window is 256 tokens" in message
    with pytest.raises(ContextLengthError) as refused:  # the very check the scheduler makes
        engine.submit(prompt)
    assert message == str(refused.value)


@pytest.mark.parametrize("raw", [
    b"{not json", b"[1, 2]", b'"text"', b"", b'{"prompt": "hi", "temperature": NaN}',
    b'{"prompt": "\\ud800 lone surrogate", "max_tokens": 2}',
    b'{"model": "\\ud800", "prompt": "hi"}',
])
def test_malformed_bodies_get_400_or_404_never_500(url, raw):
    response = httpx.post(f"{url}/v1/completions", content=raw,
                          headers={"content-type": "application/json"})
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["message"]


def test_unknown_fields_are_ignored(url):
    response = httpx.post(f"{url}/v1/chat/completions", json={
        "messages": USER, "max_tokens": 2, "user": "u-1", "metadata": {"a": "b"}, "store": False,
        "parallel_tool_calls": True, "tool_choice": "none", "response_format": {"type": "text"},
        "something_new": [1, 2], "stream_options": None, "temperature": None})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 2


def test_unknown_model_route_and_method_get_openai_errors(url):
    assert_error(httpx.post(f"{url}/v1/chat/completions",
                            json={"model": "gpt-4", "messages": USER}), 404, "model",
                 "model_not_found")
    assert_error(httpx.get(f"{url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{url}/v1/chat/completions"), 405)


def test_oversized_body_gets_413_declared_or_chunked(url):
    big = {"prompt": "x" * (70 * 1024)}
    assert_error(httpx.post(f"{url}/v1/completions", json=big), 413, code="request_too_large")

    def chunks():
        for _ in range(80):
            yield b" " * 1024

    assert_error(httpx.post(f"{url}/v1/completions", content=chunks(),
                            headers={"content-type": "application/json"}), 413)


def test_api_key_guards_v1_but_not_health_or_metrics(engine):
    app = create_app(engine, ServerConfig(served_model_name="tiny", api_key="s3cret"))
    with LiveServer(app) as server:
        chat = f"{server.url}/v1/chat/completions"
        body = {"messages": USER, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.post(chat, json=body, headers=headers)
            assert_error(response, 401, code="invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
        assert_error(httpx.get(f"{server.url}/v1/models"), 401)
        ok = httpx.post(chat, json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_without_a_key_no_header_is_needed(url):
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_full_queue_gets_503_with_retry_after(model, tokenizer):
    with InferenceEngine(model, tokenizer, max_batch_size=1) as engine, LiveServer(
            create_app(engine, ServerConfig(max_waiting=0, retry_after_s=2))) as server:
        slow_down(engine)  # so the first request is surely still running
        long = {"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long) as stream:
            lines = stream.iter_lines()  # kept: dropping it would close the stream
            next(lines)  # the first request is in flight and holds the only slot
            busy = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"})
            assert_error(busy, 503, code="queue_full")
            assert busy.headers["retry-after"] == "2"
        wait_until(lambda: httpx.post(f"{server.url}/v1/completions",
                                      json={"prompt": "hi", "max_tokens": 1}).status_code == 200,
                   what="the slot to free")


def test_health_is_503_while_loading_then_200(model, tokenizer):
    release = threading.Event()

    def loader() -> InferenceEngine:
        release.wait(30)
        return InferenceEngine(model, tokenizer)

    with LiveServer(create_app(loader)) as server:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert health.headers["retry-after"] == "1"
        assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}), 503,
                     code="loading")
        release.set()
        wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200,
                   what="the model to load")
        engine = server.server.config.app.state.serving.engine
    with pytest.raises(RuntimeError, match="shut down"):  # the app built it, the app stopped it
        engine.submit([5, 6])


def test_failed_load_reports_503_and_calls_back():
    errors = []

    def loader() -> InferenceEngine:
        raise ValueError("weights do not match config.json")

    with LiveServer(create_app(loader, on_load_error=errors.append)) as server:
        wait_until(lambda: errors, what="the load to fail")
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "load_failed"
        assert "weights do not match" in health.json()["message"]


def test_dead_engine_fails_requests_with_503_and_health_turns_503(model, tokenizer):
    engine = InferenceEngine(model, tokenizer)
    gate = threading.Event()

    def broken(batch):
        gate.wait(10)
        raise RuntimeError("boom")

    engine.scheduler.runner.run = broken
    with LiveServer(create_app(engine)) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        gate.set()
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert "boom" in assert_error(response, 503, code="engine_failed")["message"]
        assert httpx.get(f"{server.url}/health").status_code == 503
        assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}), 503,
                     code="engine_failed")
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "astrai_engine_healthy 0.0" in metrics
    engine.shutdown()


EXTREMES = [
    {"temperature": 1e308}, {"temperature": 1e-300}, {"temperature": 0},
    {"repetition_penalty": 100, "frequency_penalty": 2, "presence_penalty": -2},
    {"repetition_penalty": 0.01}, {"top_k": 10**9, "top_p": 1e-300, "min_p": 1.0},
    {"seed": -(2**63)}, {"seed": 2**63 - 1, "n": 16}, {"max_tokens": 10**30},
    {"stop": [str(i) for i in range(16)], "stop_token_ids": [0, 10**9]},
    {"logprobs": True, "top_logprobs": 20, "top_k": -1},
]


@pytest.mark.parametrize("extreme", EXTREMES, ids=[str(sorted(e)) for e in EXTREMES])
def test_extreme_valid_values_are_served_and_the_engine_stays_healthy(url, extreme):
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"messages": USER, "max_tokens": 4, **extreme})
    assert response.status_code == 200, response.text
    assert all(c["finish_reason"] in ("stop", "length") for c in response.json()["choices"])
    assert httpx.get(f"{url}/health").status_code == 200
