"""Sampling strategies against transformers' logits processors (the independent reference),
penalties by hand, the draw's distribution, seeds, greedy rows and log-probabilities."""

from __future__ import annotations

import pytest
import torch

from astrai_serve import (
    MinPStrategy,
    PenaltyStrategy,
    SamplingParams,
    SamplingPipeline,
    TemperatureStrategy,
    TopKStrategy,
    TopPStrategy,
)
from astrai_serve.sampling import compute_logprobs

lp = pytest.importorskip("transformers.generation.logits_process")


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3


def hf_rows(processor_for_row, logits: torch.Tensor) -> torch.Tensor:
    """Apply a transformers processor row by row (theirs take one value per batch)."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    return torch.cat([processor_for_row(i)(ids, logits[i : i + 1].clone()) for i in range(len(logits))])


def test_temperature_matches_transformers(logits):
    temps = [0.5, 1.0, 1.7, 0.2]
    ours = TemperatureStrategy(temps).apply(logits)
    assert torch.allclose(ours, hf_rows(lambda i: lp.TemperatureLogitsWarper(temps[i]), logits))


def test_top_k_matches_transformers_per_row(logits):
    ks = [1, 5, 0, 49]
    ours = TopKStrategy(ks).apply(logits)
    ref = hf_rows(lambda i: lp.TopKLogitsWarper(ks[i] or 50), logits)
    assert torch.equal(ours, ref)
    assert [int(torch.isfinite(r).sum()) for r in ours] == [1, 5, 50, 49]


def test_top_p_matches_transformers_per_row(logits):
    ps = [0.1, 0.5, 0.9, 1.0]
    ours = TopPStrategy(ps).apply(logits)
    ref = hf_rows(lambda i: lp.TopPLogitsWarper(ps[i]), logits)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


def test_top_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(TopPStrategy(0.8).apply(logits))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8


def test_min_p_matches_transformers_per_row(logits):
    ps = [0.05, 0.2, 0.0, 0.9]
    ours = MinPStrategy(ps).apply(logits)
    ref = hf_rows(lambda i: lp.MinPLogitsWarper(ps[i]) if ps[i] else (lambda ids, x: x), logits)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


def test_repetition_penalty_matches_transformers():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    params = [SamplingParams(repetition_penalty=1.5)]
    ours = PenaltyStrategy(params, [[0, 1]], [[3]]).apply(logits)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 1, 3]]), logits.clone())
    assert torch.allclose(ours, ref)


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.zeros(1, 4)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    ours = PenaltyStrategy(params, [[2]], [[1, 1, 3]]).apply(logits)  # prompt tokens do not count
    assert ours.tolist() == [[0.0, -1.0, 0.0, -0.75]]  # 1: 0.5 + 2 x 0.25; 3: 0.5 + 0.25


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    pipeline = SamplingPipeline.from_params([SamplingParams()] * 20000)
    counts = torch.bincount(pipeline.sample(logits), minlength=4).float() / 20000
    assert (counts - probs).abs().max() < 0.015


def test_greedy_rows_take_the_argmax_in_a_mixed_batch(logits):
    params = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0, top_k=3),
              SamplingParams(top_k=1)]
    chosen = SamplingPipeline.from_params(params).sample(logits)
    best = logits.argmax(-1)
    assert chosen[0] == best[0] and chosen[2] == best[2] and chosen[3] == best[3]


def test_a_seed_fixes_the_draw_whatever_shares_the_batch(logits):
    def first_row(seed: int, rows: int) -> int:
        gens = [torch.Generator().manual_seed(seed)] + [None] * (rows - 1)
        pipeline = SamplingPipeline.from_params([SamplingParams()] * rows)
        return int(pipeline.sample(logits[:rows], gens)[0])

    assert first_row(7, 1) == first_row(7, 4) == first_row(7, 2)
    assert len({first_row(seed, 1) for seed in range(10)}) > 1  # the seed does matter


def test_logprobs_are_the_raw_log_softmax(logits):
    chosen = logits.argmax(-1)
    out = compute_logprobs(logits, chosen, [None, 0, 3, 1])
    ref = logits.log_softmax(-1)
    assert out[0] is None
    assert out[1] == (pytest.approx(ref[1, chosen[1]].item()), [])
    value, top = out[2]
    assert value == pytest.approx(ref[2].max().item())
    assert [t for t, _ in top] == ref[2].topk(3).indices.tolist()
    assert [v for _, v in top] == pytest.approx(ref[2].topk(3).values.tolist())


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(min_p=2), "min_p"), (dict(stop=[""]), "stop"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logprobs=-1), "logprobs"),
])
def test_invalid_sampling_params_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_sample_i_of_a_seeded_request_uses_seed_plus_i():
    base = SamplingParams(seed=40, max_tokens=3, temperature=0.5)
    samples = [base.for_sample(i) for i in range(3)]
    assert [p.seed for p in samples] == [40, 41, 42]
    assert samples[0] is base and samples[2].max_tokens == 3 and samples[2].temperature == 0.5
    unseeded = SamplingParams()
    assert unseeded.for_sample(5) is unseeded  # no seed: nothing to vary
