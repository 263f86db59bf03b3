"""The engine end to end: text, streaming, async, chat requests, stop conditions, determinism,
token counts, aborts, refusals, engine death, thread safety and statistics."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from serve_helpers import EOS_ID, assert_no_pages_held, random_prompts

from astrai_core.model import Transformer, get_preset
from astrai_serve import (
    GenerationRequest,
    InferenceEngine,
    InferenceScheduler,
    KVCache,
    SamplingParams,
    Task,
)

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    with InferenceEngine(model, tokenizer, page_size=4, default_max_tokens=24) as eng:
        yield eng


def greedy_text(engine, prompt=PROMPT, **kw) -> str:
    return engine.generate(prompt, temperature=0, **kw)


def test_generate_text_for_one_prompt_and_a_list(engine):
    one = greedy_text(engine, max_tokens=12)
    assert isinstance(one, str) and one
    many = engine.generate([PROMPT, "Paged attention"], temperature=0, max_tokens=12)
    assert isinstance(many, list) and many[0] == one
    assert_no_pages_held(engine)


def test_stream_pieces_join_to_the_full_text(engine):
    full = greedy_text(engine, max_tokens=20)
    pieces = list(engine.generate(PROMPT, stream=True, temperature=0, max_tokens=20))
    assert len(pieces) > 1 and "".join(pieces) == full


def test_async_stream_joins_to_the_full_text(engine):
    full = greedy_text(engine, max_tokens=20)

    async def collect() -> list[str]:
        return [p async for p in engine.generate_async(PROMPT, temperature=0, max_tokens=20)]

    assert "".join(asyncio.run(collect())) == full


def test_closing_an_async_stream_aborts_and_frees_its_pages(engine):
    async def first_piece() -> str:
        stream = engine.generate_async(PROMPT, temperature=0, max_tokens=200, ignore_eos=True)
        piece = await anext(stream)
        await stream.aclose()
        return piece

    assert asyncio.run(first_piece())
    assert_no_pages_held(engine)


def test_the_result_is_a_view_of_its_task_and_holds_no_copy(engine):
    prompt = random_prompts([9], seed=21)[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    result = engine.submit(prompt, params, text=True).wait_completion()
    task = result._task
    assert set(vars(result)) == {"_task", "_cond", "_listeners", "_popped"}
    assert result.token_ids == task.token_ids[9:] and result.generated_tokens == 6
    assert [e.token_id for e in result.logprobs] == result.token_ids
    assert result.text == task.text.text and result.pop_all() == [result.text]
    assert result.pop_all() == []  # popped once
    assert (result.finish_reason, result.cached_tokens, result.finish_time) == (
        task.finish_reason, task.cached_tokens, task.finish_time)
    assert result.arrival_time <= result.first_token_time <= result.finish_time


def test_get_results_is_the_output_text(engine):
    params = SamplingParams(temperature=0, max_tokens=12)
    result = engine.submit(engine._encode(PROMPT), params, text=True).wait_completion()
    assert result.get_results() == result.text == greedy_text(engine, max_tokens=12)
    assert engine.submit([5, 6, 7], params).wait_completion().get_results() == ""  # ids only


def test_next_pos_is_where_the_next_token_is_fed(engine, model):
    kvcache = KVCache(model.kv_spec(), model.config.n_layers, page_size=4, max_tokens=64)
    scheduler = InferenceScheduler(model, kvcache, max_batch_size=2, max_num_tokens=8)
    prompt = random_prompts([10], seed=4)[0]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    task = Task("t", prompt, params)
    scheduler.add_task(task)  # no step loop: steps are taken by hand below
    assert task.next_pos == 0
    scheduler.step()  # the first 8 prompt tokens: the step's whole budget, no sample yet
    assert (task.next_pos, task.output_tokens) == (8, 0)
    scheduler.step()  # the last 2 prompt tokens, then the first sample
    assert (task.next_pos, task.output_tokens) == (10, 1)
    scheduler.step()  # decoding: one token fed, one sampled
    assert (task.next_pos, task.output_tokens) == (11, 2)
    assert scheduler.step() == [task] and task.result.finish_reason == "length"
    assert task.result.token_ids == engine.generate_ids([prompt], params)[0].token_ids


def test_stop_string_is_trimmed_and_never_streamed(engine):
    full = greedy_text(engine, max_tokens=24, ignore_eos=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    expected = full[: full.index(stop)]
    assert greedy_text(engine, max_tokens=24, ignore_eos=True, stop=[stop]) == expected
    streamed = "".join(engine.generate(PROMPT, stream=True, temperature=0, max_tokens=24,
                                       ignore_eos=True, stop=[stop, "never-there"]))
    assert streamed == expected
    ids = engine._encode(PROMPT)
    result = engine.submit(ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               stop=[stop]), text=True).wait_completion()
    assert result.finish_reason == "stop" and result.text == expected
    assert_no_pages_held(engine)


def test_stop_token_ids_and_max_tokens_set_the_finish_reason(engine):
    ids = engine._encode(PROMPT)
    free = engine.generate_ids([ids], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert free.finish_reason == "length" and free.generated_tokens == 10
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    stopped = engine.generate_ids([ids], SamplingParams(temperature=0, max_tokens=10,
                                                        stop_token_ids=[stop_id]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]


def test_result_counts_prompt_cached_and_generated_tokens(engine):
    ids = random_prompts([30])[0]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    first, again = engine.generate_ids([ids], params)[0], engine.generate_ids([ids], params)[0]
    assert (first.prompt_tokens, first.cached_tokens, first.generated_tokens) == (30, 0, 5)
    assert (again.prompt_tokens, again.cached_tokens, again.generated_tokens) == (30, 28, 5)
    assert again.token_ids == first.token_ids


def test_greedy_top_k_1_and_seeds_are_deterministic(engine):
    ids = [engine._encode(PROMPT)]
    greedy = engine.generate_ids(ids, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    top1 = engine.generate_ids(ids, SamplingParams(top_k=1, max_tokens=16, ignore_eos=True))
    assert greedy[0].token_ids == top1[0].token_ids
    seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=123)
    a, b = engine.generate_ids(ids, seeded)[0], engine.generate_ids(ids * 3, seeded)[1]
    assert a.token_ids == b.token_ids  # the same seed, alone or in a batch
    group = engine.generate_ids(ids, seeded, n=3)  # n samples: seeds 123, 124, 125
    assert group[0].token_ids == a.token_ids and len({tuple(r.token_ids) for r in group}) > 1
    alone = engine.generate_ids(ids, SamplingParams(**{**vars(seeded), "seed": 125}))[0]
    assert group[2].token_ids == alone.token_ids


def test_n_samples_share_the_prompt_through_the_prefix_cache(engine):
    prompt = random_prompts([21], seed=11)[0]
    group = engine.generate_ids([prompt], SamplingParams(max_tokens=4, seed=5), n=4)
    assert len(group) == 4 and all(r.generated_tokens == 4 for r in group)
    assert [r.cached_tokens for r in group] == [0, 20, 20, 20]


def test_logprobs_are_returned_per_token(engine):
    result = engine.generate_ids([random_prompts([8])[0]],
                                 SamplingParams(temperature=0, max_tokens=4, logprobs=2))[0]
    assert len(result.logprobs) == result.generated_tokens
    for token_id, entry in zip(result.token_ids, result.logprobs, strict=True):
        assert entry.token_id == token_id and entry.logprob <= 0
        assert entry.top[0][0] == token_id  # greedy picks the most likely token


def test_chat_request_goes_through_the_chat_template(engine, tokenizer):
    messages = [{"role": "user", "content": "Hello!"}]
    request = GenerationRequest(messages=messages, temperature=0, max_tokens=8)
    text = engine.generate_with_request(request)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert text == engine.submit(ids, request.sampling_params(24), text=True).wait_completion().text
    streamed = "".join(engine.generate_with_request(GenerationRequest(
        messages=messages, temperature=0, max_tokens=8, stream=True)))
    assert streamed == text


def test_closing_a_stream_aborts_and_frees_its_pages(engine):
    stream = engine.generate(PROMPT, stream=True, temperature=0, max_tokens=200, ignore_eos=True)
    next(stream)
    stream.close()
    assert_no_pages_held(engine)
    result = engine.submit(random_prompts([10])[0], SamplingParams(max_tokens=200, ignore_eos=True))
    engine.abort(result.request_id)
    assert result.wait(10) and result.finish_reason == "abort"
    assert_no_pages_held(engine)


def test_bad_requests_are_refused_with_a_clear_error(engine):
    with pytest.raises(ValueError, match="context window"):
        engine.submit(list(range(5, 5 + 256)))  # the model's max_seq_len is 256
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])
    with pytest.raises(ValueError, match="one prompt"):
        engine.generate([PROMPT, PROMPT], stream=True)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(PROMPT, top_p=0)


def test_generation_stops_at_the_context_window(model):
    with InferenceEngine(model, max_seq_len=20) as engine:
        result = engine.generate_ids([random_prompts([15])[0]],
                                     SamplingParams(max_tokens=50, ignore_eos=True))[0]
        assert result.finish_reason == "length" and result.generated_tokens == 5


def test_requests_from_many_threads_all_complete(model):
    prompts = random_prompts([5, 9, 14, 3, 22, 7, 11, 2], seed=3)
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[EOS_ID])
    with InferenceEngine(model, max_batch_size=4) as engine:
        expected = [r.token_ids for r in engine.generate_ids(prompts, params)]
        got: dict[int, list[int]] = {}

        def worker(i: int) -> None:
            got[i] = engine.submit(prompts[i], params).wait_completion(60).token_ids

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(len(prompts))] == expected
        assert_no_pages_held(engine)


def test_a_dead_step_loop_fails_every_request_and_reports_unhealthy(model):
    engine = InferenceEngine(model)
    gate = threading.Event()

    def broken(batch):
        gate.wait(10)
        raise RuntimeError("boom")

    engine.scheduler.runner.run = broken
    results = [engine.submit(p, SamplingParams(max_tokens=4)) for p in random_prompts([4, 6, 8])]
    gate.set()
    for r in results:
        with pytest.raises(RuntimeError, match="boom"):
            r.wait_completion(10)
    assert not engine.healthy and engine.get_stats()["healthy"] is False
    with pytest.raises(RuntimeError, match="unhealthy"):
        engine.submit([5, 6, 7])
    engine.shutdown()


def test_stats_and_prefix_cache_reset(model):
    with InferenceEngine(model, page_size=4) as engine:
        prompt = random_prompts([17])[0]
        engine.generate_ids([prompt, prompt], SamplingParams(max_tokens=3))
        stats = engine.get_stats()
        for key in ("running", "waiting", "kv_pages_used", "kv_pages_free", "kv_pages_cached",
                    "prefix_hit_rate", "tokens_generated", "throughput_tokens_per_s"):
            assert key in stats
        assert stats["tokens_generated"] == 6 and stats["kv_pages_cached"] > 0
        engine.reset_prefix_cache()
        assert engine.get_stats()["kv_pages_cached"] == 0
        assert engine.generate_ids([prompt], SamplingParams(max_tokens=3))[0].cached_tokens == 0
        assert_no_pages_held(engine)


def test_shutdown_aborts_requests_in_flight(model):
    engine = InferenceEngine(model)
    result = engine.submit(random_prompts([8])[0], SamplingParams(max_tokens=250, ignore_eos=True))
    engine.shutdown()
    assert result.done and result.finish_reason in ("abort", "length")
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit([5, 6])


def test_bf16_model_serves_on_cpu():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", init_std=0.2)).to(torch.bfloat16).eval()
    with InferenceEngine(model, page_size=4) as engine:
        assert engine.kvcache.storage.k_cache.dtype == torch.bfloat16
        results = engine.generate_ids(random_prompts([3, 11]), SamplingParams(temperature=0, max_tokens=5))
        assert [r.generated_tokens for r in results] == [5, 5]
        assert_no_pages_held(engine)
