"""Prompt scoring for evaluation harnesses: `/v1/completions` with `echo` and `logprobs` returns
each prompt token's log-probability given the tokens before it (null for the first), with
`max_tokens: 0` allowed, checked against log-probabilities computed directly from the model."""

from __future__ import annotations

import httpx
import pytest
import torch
from api_helpers import sse_payloads
from constrained_helpers import DIM, N_LAYERS, openai_client, random_model, served

from tolerances import forward_bound

openai = pytest.importorskip("openai")

# The served forward and the direct one below compute the same logits in another batch layout;
# a log-probability moves by at most twice its logits' error (tests/tolerances.py), and
# LOGIT_BOUND is checked against the direct logits in each test.
LOGIT_BOUND = 30.0
LOGPROB_ERROR = 2 * forward_bound(N_LAYERS, max(DIM, 128), scale=LOGIT_BOUND, dtype=torch.float32)
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model():
    return random_model(seed=3)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with served(model, tokenizer) as (engine, url):
        yield engine, url


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens before it) for t >= 1, from one plain forward of the model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()
    assert logits.abs().max().item() <= LOGIT_BOUND
    logp = logits.log_softmax(-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_echo_with_max_tokens_0_scores_every_prompt_token(server, model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    answer = openai_client(server[1]).completions.create(
        model="tiny", prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    choice = answer.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = direct_logprobs(model, ids)
    assert lp.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=LOGPROB_ERROR)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert len(top) == 3 and max(top.values()) >= chosen - LOGPROB_ERROR
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 0)


def test_multiple_choice_answers_rank_by_their_summed_logprobs(server, model, tokenizer):
    """What lm-eval's loglikelihood requests do: score context + continuation, sum the
    continuation's token logprobs."""
    context = tokenizer.encode("Question: which animal jumps? Answer:")
    options = [tokenizer.encode(" the fox"), tokenizer.encode(" a rock"), [17, 42, 99]]
    prompts = [context + option for option in options]
    answer = httpx.post(f"{server[1]}/v1/completions", timeout=60, json={
        "prompt": prompts, "echo": True, "logprobs": 0, "max_tokens": 0}).json()
    for choice, prompt, option in zip(answer["choices"], prompts, options, strict=True):
        got = sum(choice["logprobs"]["token_logprobs"][len(context):])
        want = direct_logprobs(model, prompt)[len(context) - 1:].sum().item()
        assert got == pytest.approx(want, abs=LOGPROB_ERROR * len(option))
        assert all(top == {} for top in choice["logprobs"]["top_logprobs"][1:])


def test_echo_with_generation_puts_the_prompt_first(server, tokenizer):
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(f"{server[1]}/v1/completions", json=body, timeout=60).json()
    plain = httpx.post(f"{server[1]}/v1/completions", json={**body, "echo": False},
                       timeout=60).json()
    choice, generated = whole["choices"][0], plain["choices"][0]
    assert choice["text"] == PROMPT + generated["text"]
    n_prompt = len(tokenizer.encode(PROMPT))
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n_prompt + 5 and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][n_prompt:] == pytest.approx(
        generated["logprobs"]["token_logprobs"], abs=LOGPROB_ERROR)
    with httpx.stream("POST", f"{server[1]}/v1/completions", json={**body, "stream": True},
                      timeout=60) as response:
        events = sse_payloads(list(response.iter_lines()))
    first = events[0]["choices"][0]
    assert first["text"] == PROMPT and len(first["logprobs"]["tokens"]) == n_prompt
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert streamed == choice["text"] and events[-1] == "[DONE]"


def test_scoring_streams_too_and_token_prompts_echo_as_text(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    body = {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server[1]}/v1/completions", json=body, timeout=60) as response:
        events = sse_payloads(list(response.iter_lines()))
    assert events[0]["choices"][0]["text"] == tokenizer.decode(ids, skip_special_tokens=False)
    assert events[1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["prompt_tokens"] == len(ids) and events[-1] == "[DONE]"


def test_max_tokens_0_without_echo_is_a_400(server):
    response = httpx.post(f"{server[1]}/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    assert "echo" in response.json()["error"]["message"]
