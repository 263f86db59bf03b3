"""Streaming under stress: Chinese and emoji arrive whole, a client that leaves (mid-stream,
while queued, or while waiting for a whole answer) gets its request aborted and its KV pages
back, and 32 concurrent streaming clients all complete."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from api_helpers import LiveServer, memorizing_model, metrics, slow_down, sse_payloads, wait_until

from astrai_serve import InferenceEngine
from astrai_serve.api import create_app

TEXT = "中文 🚀 和 emoji 😀 都可以。"
LONG = {"prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True}


def test_chinese_and_emoji_stream_without_a_broken_character(tokenizer):
    model, ids = memorizing_model(tokenizer, TEXT)  # greedy output is exactly TEXT
    assert len(ids) - 2 > len(TEXT)  # some characters take several tokens
    with InferenceEngine(model, tokenizer, page_size=4) as engine, \
            LiveServer(create_app(engine)) as server:
        body = {"prompt": ids[:1], "temperature": 0, "max_tokens": 64, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            raw = response.read()
    payloads = sse_payloads(raw.decode("utf-8").splitlines())  # strict UTF-8 on the wire
    pieces = [p["choices"][0]["text"] for p in payloads if p != "[DONE]" and p["choices"]]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in piece for piece in pieces) and len(pieces) > 5
    usage = payloads[-2]["usage"]
    assert usage["completion_tokens"] == len(ids) - 1  # tokens (eos included), not pieces
    assert payloads[-1] == "[DONE]"


def test_a_token_that_is_a_unicode_line_break_keeps_each_event_on_one_line(tokenizer):
    """U+0085, U+2028 and U+2029 are line breaks to str.splitlines (httpx's `iter_lines`) and to
    JavaScript: sent raw inside the JSON they cut an event in two for those clients."""
    text = "a\u2028b\u2029c\x85d"
    model, ids = memorizing_model(tokenizer, text)
    with InferenceEngine(model, tokenizer, page_size=4) as engine, \
            LiveServer(create_app(engine)) as server:
        body = {"prompt": ids[:1], "temperature": 0, "max_tokens": 32, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            lines = list(response.iter_lines())
    payloads = sse_payloads(lines)  # every data line parses
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1] if p["choices"]) == text
    assert payloads[-1] == "[DONE]"


@pytest.fixture
def slow_server(model, tokenizer):
    with InferenceEngine(model, tokenizer, page_size=4, max_batch_size=1) as engine, \
            LiveServer(create_app(engine)) as server:
        slow_down(engine)
        yield server.url


def engine_is_idle(url: str) -> bool:
    m = metrics(url)
    return (m["astrai_num_requests_running"] == 0 and m["astrai_num_requests_waiting"] == 0
            and m["astrai_kv_cache_pages_used"] == 0)


def test_leaving_mid_stream_aborts_and_frees_the_pages(slow_server):
    url = slow_server
    with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as stream:
        lines = stream.iter_lines()
        next(lines)
        busy = metrics(url)
        assert busy["astrai_num_requests_running"] == 1
        assert busy["astrai_kv_cache_pages_used"] > 0
    wait_until(lambda: engine_is_idle(url), what="the pages to come back")
    assert metrics(url)['astrai_requests_total{finish_reason="abort"}'] == 1


def test_leaving_while_queued_or_waiting_for_a_whole_answer_aborts(slow_server):
    url = slow_server
    with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as first:
        lines = first.iter_lines()
        next(lines)  # holds the engine's only batch slot
        with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}):
            wait_until(lambda: metrics(url)["astrai_num_requests_waiting"] == 1,
                       what="the second request to queue")
        # The queued stream never sent an event; its leaving is still noticed.
        wait_until(lambda: metrics(url)["astrai_num_requests_waiting"] == 0,
                   what="the queued request to go")
    wait_until(lambda: engine_is_idle(url), what="the first request to go")
    with pytest.raises(httpx.ReadTimeout):  # a whole answer nobody waits for any more
        httpx.post(f"{url}/v1/completions", json=LONG, timeout=httpx.Timeout(5, read=0.5))
    wait_until(lambda: engine_is_idle(url), what="the whole-answer request to go")
    assert metrics(url)['astrai_requests_total{finish_reason="abort"}'] == 3


async def stream_chat(client: httpx.AsyncClient, url: str, i: int) -> tuple[str, dict]:
    body = {"messages": [{"role": "user", "content": f"Request {i}: the quick brown fox"}],
            "max_tokens": 16, "ignore_eos": True, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        lines = [line async for line in response.aiter_lines()]
    payloads = sse_payloads(lines)
    assert payloads[-1] == "[DONE]" and not any("error" in p for p in payloads[:-1])
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-2])
    return text, payloads[-2]["usage"]


def test_32_concurrent_streaming_clients_all_complete(model, tokenizer):
    async def run(url: str) -> list[tuple[str, dict]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(stream_chat(c, url, i) for i in range(32)))

    with InferenceEngine(model, tokenizer, page_size=4, max_batch_size=8) as engine, \
            LiveServer(create_app(engine)) as server:
        results = asyncio.run(run(server.url))
        assert [usage["completion_tokens"] for _, usage in results] == [16] * 32
        again = asyncio.run(run(server.url))
        assert [text for text, _ in again] == [text for text, _ in results]  # seeded
        wait_until(lambda: engine_is_idle(server.url), what="the engine to go idle")
        m = metrics(server.url)
        assert m['astrai_requests_total{finish_reason="length"}'] == 64
        assert m["astrai_time_to_first_token_seconds_count"] == 64
        assert m["astrai_inter_token_latency_seconds_count"] == 64 * 15
        assert m["astrai_generation_tokens_total"] == 64 * 16


def test_metrics_are_prometheus_text_with_the_documented_names(model, tokenizer):
    with InferenceEngine(model, tokenizer) as engine, LiveServer(create_app(engine)) as server:
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3,
                                                          "ignore_eos": True})
        response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    m = metrics_from_text(response.text)
    for name in ("astrai_time_to_first_token_seconds_bucket", "astrai_num_requests_running",
                 "astrai_inter_token_latency_seconds_bucket", "astrai_num_requests_waiting",
                 "astrai_e2e_request_latency_seconds_bucket", "astrai_kv_cache_usage_ratio",
                 "astrai_prefix_cache_hit_rate", "astrai_prompt_tokens_total",
                 "astrai_generation_tokens_total", "astrai_preemptions_total"):
        assert name in m, name
    assert m["astrai_generation_tokens_total"] == 3 and m["astrai_prompt_tokens_total"] > 0


def metrics_from_text(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out.setdefault(name.split("{")[0], json.loads(value))
    return out
