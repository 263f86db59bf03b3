"""The official `openai` client against a live server: chat and text completions, streamed and
whole, usage, stop strings, n > 1 and logprobs, checked against the engine and transformers."""

from __future__ import annotations

import pytest
import torch
from api_helpers import LiveServer

from astrai_serve import InferenceEngine, SamplingParams
from astrai_serve.api import ServerConfig, create_app
from tolerances import forward_bound

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "The quick brown fox"}]
NO_EOS = {"ignore_eos": True}  # random weights: make lengths predictable
# The served model (conftest: 2 layers, width <= 128, fp32) in another batch layout or through
# the prefix cache rounds differently; a log-probability moves by at most twice its logits'
# error (tests/tolerances.py). LOGIT_BOUND is checked against transformers' logits below.
LOGIT_BOUND = 30.0
LOGPROB_ERROR = 2 * forward_bound(2, 128, scale=LOGIT_BOUND, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    with InferenceEngine(model, tokenizer, page_size=4, max_batch_size=16) as eng:
        yield eng


@pytest.fixture(scope="module")
def client(engine):
    with LiveServer(create_app(engine, ServerConfig(served_model_name="tiny"))) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                            timeout=60)


def chat(client, **kw):
    args = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12, extra_body=NO_EOS)
    return client.chat.completions.create(**{**args, **kw})


def stream_text(chunks) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = []
    for chunk in chunks:
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for choice in chunk.choices:
            piece = getattr(choice, "delta", None)
            piece = piece.content if piece is not None else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_chat_answer_equals_the_engine_and_counts_tokens(client, engine, tokenizer):
    answer = chat(client)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    expected = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                             text=True).wait_completion()
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" and answer.model == "tiny"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 12)
    assert answer.usage.total_tokens == len(prompt) + 12


def test_chat_stream_joins_to_the_whole_answer_with_usage_last(client):
    whole = chat(client).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    texts, reasons, usage = stream_text(chunks)
    assert texts == {0: whole} and reasons == {0: "length"}
    assert len(usage) == 1 and chunks[-1].usage is usage[0] and not chunks[-1].choices
    assert usage[0].completion_tokens == 12
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 3  # streamed in pieces, not at once


def test_stop_string_ends_the_answer_before_it(client):
    whole = chat(client, max_tokens=20).choices[0].message.content
    stop = whole[8:11]
    assert len(stop) == 3
    answer = chat(client, max_tokens=20, stop=[stop, "never there"])
    assert answer.choices[0].message.content == whole[: whole.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    texts, reasons, _ = stream_text(chat(client, max_tokens=20, stop=stop, stream=True))
    assert texts == {0: whole[: whole.index(stop)]} and reasons == {0: "stop"}


def test_n_choices_are_seeded_samples_streamed_interleaved(client):
    sampled = dict(temperature=1.0, seed=7, max_tokens=10)
    many = chat(client, n=3, **sampled)
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.message.content for c in many.choices]
    assert texts[0] == chat(client, **sampled).choices[0].message.content  # sample 0: seed 7
    assert texts[1] == chat(client, **{**sampled, "seed": 8}).choices[0].message.content
    assert len(set(texts)) > 1 and many.usage.completion_tokens == 30
    streamed, reasons, _ = stream_text(chat(client, n=3, stream=True, **sampled))
    assert streamed == dict(enumerate(texts)) and set(reasons) == {0, 1, 2}


def test_chat_logprobs_have_top_alternatives_and_exact_bytes(client, tokenizer):
    answer = chat(client, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 12
    specials = set(tokenizer.special_tokens.values())
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
    text_bytes = b"".join(bytes(e.bytes) for e in content if e.token not in specials)
    assert text_bytes.decode("utf-8", errors="replace") == answer.choices[0].message.content
    streamed = [entry for chunk in chat(client, logprobs=True, top_logprobs=3, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # The second request reads its prompt from the prefix cache: equal up to float rounding.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content],
                                                          abs=LOGPROB_ERROR)


def test_completion_logprobs_equal_transformers(client, hf_model):
    prompt = [17, 42, 99, 5, 250, 8]
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                       logprobs=2, extra_body=NO_EOS)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                output_logits=True, return_dict_in_generate=True,
                                eos_token_id=None, pad_token_id=3)
    assert max(step.abs().max().item() for step in out.logits) <= LOGIT_BOUND
    expected = [torch.log_softmax(step[0].float(), -1).max().item() for step in out.logits]
    got = answer.choices[0].logprobs
    assert got.token_logprobs == pytest.approx(expected, abs=LOGPROB_ERROR)
    assert [max(top.values()) for top in got.top_logprobs] == pytest.approx(expected,
                                                                           abs=LOGPROB_ERROR)
    assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)


def test_completions_take_a_list_of_prompts_and_stream(client):
    args = dict(model="tiny", max_tokens=8, temperature=0, extra_body=NO_EOS)
    one = [client.completions.create(prompt=p, **args).choices[0].text
           for p in ("Paged attention", "小模型")]
    both = client.completions.create(prompt=["Paged attention", "小模型"], **args)
    assert [c.text for c in both.choices] == one and both.usage.completion_tokens == 16
    assert all(c.finish_reason == "length" for c in both.choices)
    texts, reasons, usage = stream_text(client.completions.create(
        prompt=["Paged attention", "小模型"], stream=True,
        stream_options={"include_usage": True}, **args))
    assert texts == dict(enumerate(one)) and reasons == {0: "length", 1: "length"}
    assert usage[0].completion_tokens == 16 and usage[0].prompt_tokens == both.usage.prompt_tokens


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError):
        chat(client, model="gpt-4")
