"""The `astrai` lm-eval model: its log-likelihoods equal a direct fp32 forward of the model, on
the serving engine and on the direct path alike; greedy generate_until is the engine's greedy
output cut at the stop strings; rolling windows score every token once, as lm-eval's own."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import continuation_logprob, make_model_dir, train_tokenizer

from astrai_core import AutoModel, AutoTokenizer
from astrai_serve import InferenceEngine, SamplingParams
from tolerances import forward_bound

pytest.importorskip("lm_eval", reason="lm-eval is the eval extra: uv sync (dev) or "
                                      "pip install 'astrai-train[eval]'")
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from astrai_train.evaluation.lm_eval_adapter import AstraiLM
from astrai_train.evaluation.scoring import rolling_windows

N_LAYERS, WIDTH = 2, 176  # the tiny preset: 2 layers, sums of at most dim_ffn = 176 products

PAIRS = [  # (context, continuation): shared contexts, multi-token answers, Chinese, empty context
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Berlin and Rome"),
    ("The capital of France is", " oak"),
    ("二加三等于", "五"),
    ("二加三等于", "八，四加四等于八。"),
    ("Water boils at", " one hundred degrees"),
    ("", "Cats and dogs are animals."),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    return make_model_dir(root / "model", train_tokenizer(root), seed=3)


@pytest.fixture(scope="module")
def model(folder):
    return AutoModel.from_pretrained(folder, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _reference(model, tokenizer, context: str, continuation: str):
    """The harness's own split (encode the whole, the context's tokens first), then a plain
    forward; an empty context is the eos token."""
    if not context:
        return continuation_logprob(model, [tokenizer.eos_id], tokenizer.encode(continuation))
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return continuation_logprob(model, ctx, whole[len(ctx):])


@pytest.mark.parametrize("scoring", ["engine", "model"])
def test_loglikelihood_equals_a_direct_fp32_forward(model, tokenizer, scoring):
    lm = AstraiLM(model=model, tokenizer=tokenizer, scoring=scoring)
    try:
        got = lm.loglikelihood(_instances("loglikelihood", PAIRS))
    finally:
        lm.close()
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got, strict=True):
        expected, expected_greedy, scale = _reference(model, tokenizer, context, continuation)
        n = len(tokenizer.encode(context + continuation)) - len(tokenizer.encode(context))
        # Each token's log-probability moves by at most twice its logits' error; n are summed.
        bound = 2 * max(n, 1) * forward_bound(N_LAYERS, WIDTH, scale, torch.float32)
        assert abs(logprob - expected) <= bound, (context, continuation, logprob, expected)
        assert greedy == expected_greedy


def test_the_engine_serves_shared_contexts_from_its_prefix_cache(model, tokenizer):
    long_context = " ".join(["The capital of France is Paris."] * 6)
    pairs = [(long_context, f" {w}") for w in ("Paris", "Berlin", "Rome", "oak")]
    with InferenceEngine(model, tokenizer, page_size=4) as engine:
        lm = AstraiLM(model=model, tokenizer=tokenizer, engine=engine, scoring="engine")
        lm.loglikelihood(_instances("loglikelihood", pairs))
        stats = engine.get_stats()
    prompt = len(tokenizer.encode(long_context))
    # The three later answers read every full page of the first one's prompt.
    assert stats["cached_tokens"] == 3 * ((prompt - 1) // 4 * 4)


def test_greedy_generate_until_is_the_engine_greedy_output_cut_at_stop_strings(model, tokenizer):
    prompts = ["The capital of France is", "二加三等于", "Water boils at one"]
    stops = [".", "。", "degrees"]
    with InferenceEngine(model, tokenizer) as engine:
        plain = engine.generate_ids([tokenizer.encode(p) for p in prompts],
                                    SamplingParams(max_tokens=24, temperature=0.0))
        lm = AstraiLM(model=model, tokenizer=tokenizer, engine=engine)
        requests = _instances("generate_until",
                              [(p, {"until": stops, "max_gen_toks": 24}) for p in prompts])
        got = lm.generate_until(requests)
    for result, text in zip(plain, got, strict=True):
        full = tokenizer.decode(result.token_ids)
        cut = min([full.index(s) for s in stops if s in full], default=len(full))
        assert text == full[:cut]


def test_rolling_windows_match_lm_eval_s_own_and_score_every_token_once():
    tokens = list(range(100, 137))
    for window in (1, 4, 8, 36, 37, 64):
        theirs = [make_disjoint_window(w) for w in
                  get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=window,
                                            context_len=1)]
        ours = rolling_windows(tokens, 7, window)
        # lm-eval's pairs are (context, continuation); ours are (inputs, targets)
        assert [(ctx + cont[:-1], cont) for ctx, cont in theirs] == ours
        assert [t for _, targets in ours for t in targets] == tokens
        assert all(len(inputs) <= window for inputs, _ in ours)


def test_loglikelihood_rolling_is_the_whole_document_given_the_eos(model, tokenizer):
    text = "北京是中国的首都。The capital of France is Paris."
    lm = AstraiLM(model=model, tokenizer=tokenizer)
    (got,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    expected, _, scale = continuation_logprob(model, [tokenizer.eos_id], tokenizer.encode(text))
    n = len(tokenizer.encode(text))
    assert abs(got - expected) <= 2 * n * forward_bound(N_LAYERS, WIDTH, scale, torch.float32)


def test_a_document_longer_than_the_window_is_scored_in_windows(model, tokenizer):
    text = " ".join(["Water boils at one hundred degrees."] * 12)
    tokens = tokenizer.encode(text)
    lm = AstraiLM(model=model, tokenizer=tokenizer, max_seq_len=16)
    assert len(tokens) > 3 * 16
    (got,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    expected, bound = 0.0, 0.0
    for inputs, targets in rolling_windows(tokens, tokenizer.eos_id, 16):
        first = len(inputs) - len(targets)
        logp, _, scale = continuation_logprob(model, inputs[:first + 1], targets)
        expected += logp
        bound += 2 * len(targets) * forward_bound(N_LAYERS, WIDTH, scale, torch.float32)
    assert abs(got - expected) <= bound


def test_bad_settings_fail_with_one_clear_line(model, tokenizer):
    with pytest.raises(ValueError, match="scoring must be one of engine, model"):
        AstraiLM(model=model, tokenizer=tokenizer, scoring="fast")
    with pytest.raises(ValueError, match=r"max_seq_len must be in \[2, 128\]"):
        AstraiLM(model=model, tokenizer=tokenizer, max_seq_len=4096)
    with pytest.raises(ValueError, match="needs pretrained=MODEL_DIR"):
        AstraiLM()


def test_shared_contexts_give_the_same_scores_in_any_batching(model, tokenizer):
    from astrai_train.evaluation.scoring import score_requests

    pairs = [(tokenizer.encode(c) or [tokenizer.eos_id], tokenizer.encode(k)) for c, k in PAIRS]
    one_batch = score_requests(model, pairs, 128)
    many = score_requests(model, pairs, 128, batch_tokens=8)  # one context per forward
    plain = [continuation_logprob(model, c, k) for c, k in pairs]
    for a, b, (ref, greedy, scale) in zip(one_batch, many, plain, strict=True):
        bound = 2 * a.n_tokens * forward_bound(N_LAYERS, WIDTH, scale, torch.float32)
        assert abs(a.logprob - ref) <= bound and abs(b.logprob - ref) <= bound
        assert a.is_greedy == b.is_greedy == greedy


def test_lm_eval_finds_the_model_by_name_and_loads_a_folder(folder, model, tokenizer):
    from lm_eval.api.registry import get_model

    lm = get_model("astrai").create_from_arg_string(f"pretrained={folder},dtype=float32,scoring=model",
                                                   {"batch_size": 8, "device": "cpu"})
    direct = AstraiLM(model=model, tokenizer=tokenizer, scoring="model")
    requests = _instances("loglikelihood", PAIRS[:3])
    try:
        assert isinstance(lm, AstraiLM) and lm.batch == 8
        assert lm.loglikelihood(requests) == direct.loglikelihood(requests)
    finally:
        lm.close()
