"""The chat page at `GET /`: static files shipped in the package, nothing from elsewhere, off with
`--no-web`; and in a real headless Chromium (Debian's, driven by Playwright): it streams a reply
from the server, sends the API key, stops and clears."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from api_helpers import LiveServer, slow_down, wait_until
from constrained_helpers import random_model, served, trained_to_answer
from typer.testing import CliRunner

from astrai_core.cli.main import app as cli_app
from astrai_serve import InferenceEngine
from astrai_serve.api import ServerConfig, create_app

KEY = "page-key"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No sandbox (root in a container), no GPU, and nothing that would reach out of the machine.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick fox?"}]
REPLY = "It jumps over the lazy dog. 小模型也可以在普通电脑上运行。"


@pytest.fixture(scope="module")
def model():
    return random_model(seed=2)


@pytest.fixture(scope="module")
def replier(tokenizer):
    """Trained to give REPLY to CHAT, so the page shows readable text known in advance."""
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    end = tokenizer.token_to_id("<|im_end|>")
    return trained_to_answer(prompt, [*tokenizer.encode(REPLY), end])


def test_the_page_and_its_files_are_served_and_need_nothing_from_elsewhere(model, tokenizer):
    with served(model, tokenizer) as (_, url):
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="web/chat.js"' in page.text and 'href="web/chat.css"' in page.text
        script = httpx.get(f"{url}/web/chat.js")
        style = httpx.get(f"{url}/web/chat.css")
        assert "javascript" in script.headers["content-type"] and "text/css" in style.headers[
            "content-type"]
        for text in (page.text, script.text, style.text):
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE)
        assert "v1/chat/completions" in script.text
        assert "/" not in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_no_web_turns_the_page_off(model, tokenizer):
    with InferenceEngine(model, tokenizer) as engine, \
            LiveServer(create_app(engine, ServerConfig(web=False))) as server:
        assert httpx.get(f"{server.url}/").status_code == 404
        assert httpx.get(f"{server.url}/web/chat.js").status_code == 404
        assert httpx.get(f"{server.url}/v1/models").status_code == 200
    help_text = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--no-web" in help_text


def _chromium_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium: install Debian's (apt-get install chromium) to run the "
                    "browser test; CI installs it")
    return pytest.importorskip("playwright.sync_api", reason="the playwright package drives "
                               "Chromium (uv sync installs it with the dev group)")


@pytest.mark.slow
def test_the_page_streams_a_reply_in_chromium(replier, tokenizer, tmp_path: Path):
    playwright_api = _chromium_or_skip()
    with InferenceEngine(replier, tokenizer, page_size=16) as engine, LiveServer(create_app(
            engine, ServerConfig(served_model_name="tiny", api_key=KEY))) as server, \
            playwright_api.sync_playwright() as pw:
        slow_down(engine, 0.03)  # a token per step, each step long enough to see text grow
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function("document.getElementById('model').textContent.includes('key')")
            page.fill("#api_key", KEY)
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
            page.fill("#system", CHAT[0]["content"])
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "64")
            page.evaluate("""() => {
                window.seen = [];
                new MutationObserver(() => {
                    const out = document.querySelector('.msg.assistant .text');
                    if (out) window.seen.push(out.textContent.length);
                }).observe(document.getElementById('messages'),
                           {subtree: true, childList: true, characterData: true});
            }""")
            page.fill("#input", CHAT[1]["content"])
            page.press("#input", "Enter")
            page.wait_for_selector("body[data-busy='1']")
            page.wait_for_selector("body[data-busy='0']", timeout=60_000)
            shown = page.eval_on_selector(".msg.assistant .text", "e => e.textContent")
            lengths = page.evaluate("window.seen")
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

            assert shown == REPLY
            assert len({n for n in lengths if 0 < n < len(shown)}) >= 2, lengths  # streamed
            assert (tmp_path / "chat.png").stat().st_size > 10_000

            slow_down(engine, 1.0)  # the next reply's first token is a second away: stop it
            page.fill("#input", "Tell me more")
            page.press("#input", "Enter")
            page.wait_for_selector("body[data-busy='1']")
            page.click("#stop")
            page.wait_for_selector("body[data-busy='0']")
            assert page.inner_text(".msg.assistant:last-child .note") == "stopped"
            wait_until(lambda: engine.get_stats()["running"] == 0, what="the request to abort")

            page.click("#clear")
            assert page.eval_on_selector_all("#messages > *", "els => els.length") == 0
            page.fill("#api_key", "wrong")
            page.fill("#input", "hello")
            page.press("#input", "Enter")
            page.wait_for_selector("#error:not([hidden])")
            assert "API key" in page.inner_text("#error")
        finally:
            browser.close()
