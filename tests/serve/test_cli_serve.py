"""`astrai serve` as a real process: it loads, answers with auth on, and on SIGTERM ends the
stream in flight and exits 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from api_helpers import LiveServer, model_folder, slow_down, sse_payloads, wait_until

from astrai_serve import InferenceEngine
from astrai_serve.api import create_app

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.TransportError:
        return 0  # not listening yet


@pytest.mark.slow
def test_serve_answers_with_auth_and_exits_0_on_sigterm(tmp_path, hf_folder, tokenizer):
    folder = model_folder(tmp_path / "tiny", hf_folder, tokenizer)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "astrai_core.cli.main", "serve", str(folder), "--port", str(port),
         "--api-key", KEY, "--shutdown-timeout", "10", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: health(url) == 200 or process.poll() is not None, timeout=120,
                   interval=0.2, what="the server to be ready")
        assert process.poll() is None, process.communicate()
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"

        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"prompt": "The quick", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth,
                              timeout=60) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        reader.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert f"{url}/v1" in out and "curl" in out  # the banner
    assert sse_payloads(lines)[-1] == "[DONE]"  # the stream in flight ended properly


def test_shutdown_refuses_new_requests_and_aborts_streams_past_the_grace_period(model,
                                                                                tokenizer):
    with InferenceEngine(model, tokenizer, page_size=4) as engine:
        slow_down(engine, 0.02)  # 200 tokens take 4 s; the grace period is 0.5 s
        server = LiveServer(create_app(engine), shutdown_timeout=0.5).__enter__()
        body = {"prompt": "The quick", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            server.server.should_exit = True  # what uvicorn's SIGTERM handler does
            wait_until(lambda: health(server.url) == 0, what="the listener to close")
            with pytest.raises(httpx.TransportError):
                list(lines)  # cut off at the end of the grace period
        server.__exit__()

        def idle() -> bool:
            stats = engine.get_stats()
            return stats["running"] == 0 and stats["kv_pages_used"] == 0

        wait_until(idle, what="the cut-off request to be aborted")
