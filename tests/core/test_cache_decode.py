"""Token-by-token decoding through a cache gives the logits of one full forward."""

from __future__ import annotations

import pytest
import torch

from astrai_core.model import ModelConfig, Transformer, generate, get_preset
from tolerances import forward_bound

MLA_TINY = dict(attention_type="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12)
CONFIGS = {
    "gqa-qknorm": get_preset("tiny"),
    "gqa-gated": get_preset("tiny", use_gated_attention=True, use_qk_norm=False),
    "mla": get_preset("tiny", **MLA_TINY),
}


@pytest.fixture(params=list(CONFIGS))
def model(request) -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIGS[request.param]).eval()


def _bound(model: Transformer, full: torch.Tensor) -> float:
    """Cached and full forwards round differently; in float64 (tests/tolerances.py)."""
    c = model.config
    return forward_bound(c.n_layers, max(c.dim, c.dim_ffn), scale=full.abs().max().item())


@torch.no_grad()
def test_decode_token_by_token_matches_full_forward(model):
    model = model.double()
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    cache = model.make_cache(2, 16)
    steps = []
    for t in range(ids.shape[1]):
        cache.begin(torch.ones(2, 1, dtype=torch.bool))
        pos = torch.full((2, 1), t)
        steps.append(model(ids[:, t : t + 1], paged_cache=cache, position_ids=pos))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= _bound(model, full)


@torch.no_grad()
def test_chunked_prefill_then_decode_matches_full_forward(model):
    model = model.double()
    ids = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.make_cache(1, 32)
    outs, start = [], 0
    for size in (5, 7, 1, 4):
        cache.begin(torch.ones(1, size, dtype=torch.bool))
        pos = torch.arange(start, start + size)[None]
        outs.append(model(ids[:, start : start + size], paged_cache=cache, position_ids=pos))
        start += size
    assert (torch.cat(outs, dim=1) - full).abs().max().item() <= _bound(model, full)


@torch.no_grad()
def test_generate_batched_equals_one_by_one(model):
    prompts = [[5, 9, 11], [7], [1, 2, 3, 4, 5, 6]]
    batched = generate(model, prompts, max_new_tokens=6)
    single = [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


@torch.no_grad()
def test_generate_stops_at_stop_id():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).eval()
    first = generate(model, [[3, 4, 5]], max_new_tokens=8)[0]
    stopped = generate(model, [[3, 4, 5]], max_new_tokens=8, stop_ids=[first[2]])[0]
    assert stopped == first[: first.index(first[2]) + 1]


def test_generate_refuses_prompts_past_the_context_window():
    model = Transformer(ModelConfig(vocab_size=32, dim=16, n_layers=1, dim_ffn=32, n_heads=2,
                                    n_kv_heads=1, max_seq_len=8))
    with pytest.raises(ValueError, match="context window"):
        generate(model, [[1] * 6], max_new_tokens=4)


def test_mla_cache_is_smaller_than_gqa_for_the_1b_shape():
    """The ratio stated in the MLA docstring: 288 / 512 values per token and layer."""
    with torch.device("meta"):
        gqa, mla = Transformer(get_preset("1b")), Transformer(get_preset("1b-mla"))
    ratio = mla.kv_spec().elements_per_token() / gqa.kv_spec().elements_per_token()
    assert gqa.kv_spec().elements_per_token() == 512
    assert ratio == pytest.approx(0.5625)
