"""`KernelDecoderBlock`: a decode step's block as one kernel call gives the unfused
block's result (fp32 to rounding, int8 within its stated error), falls back to the block's own
forward wherever the kernel does not apply, and leaves the model's weights and names alone."""

from __future__ import annotations

import copy

import pytest
import torch
from serve_helpers import EOS_ID, assert_no_pages_held, random_prompts

from astrai_core.model import DecoderBlock, ModelConfig, Transformer
from astrai_serve import InferenceEngine, KVCache, SamplingParams, kernels
from astrai_serve.kernels.decode_block import KernelDecoderBlock
from astrai_serve.kvcache.packed_view import PackedView
from astrai_serve.quantize import prepare_model
from tolerances import INT8_STAGE, forward_bound, reduced_precision_bound

FEATURES = {
    "plain": {},
    "qk-norm-gated": dict(use_qk_norm=True, use_gated_attention=True),
    "biases": dict(attention_bias=True, attention_out_bias=True, mlp_bias=True),
}
DONE = {0: 33, 1: 7, 2: 18}  # cached tokens per row before the decode step


@pytest.fixture(scope="module", autouse=True)
def small_batch():
    loaded = kernels.load()
    if loaded is None:
        pytest.skip(kernels.status())
    if torch.get_num_threads() < 2:
        pytest.skip("serving keeps torch's linear layers on one thread (prepare_model)")
    return loaded


@pytest.fixture(autouse=True)
def kernel_rows(monkeypatch):
    """The fp32 row limit is tuned per CPU (one row where oneDNN has AVX512): these tests run
    the kernel over every row count it takes, whatever this CPU's tuning."""
    monkeypatch.setattr(kernels, "F32_MAX_ROWS", kernels.F32_KERNEL_ROWS)


def _config(**extra) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=96,
                       max_seq_len=128, **extra)


@torch.inference_mode()
def _decode_step(model: Transformer, seqs: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, PackedView]:
    """Prefill each row's first DONE[row] tokens (scattered pages), then one packed decode step
    of `rows`; returns its logits (rows, vocab) and the step's view."""
    cache = KVCache(model.kv_spec(), model.config.n_layers, page_size=4, max_tokens=64 * len(rows))
    for row in sorted(rows, reverse=True):
        cache.task_alloc(row, seqs[row].tolist())
        cache.task_extend(row, DONE[row % 3] + 1)
        view = cache.bind([row], [0], DONE[row % 3])
        model(seqs[row : row + 1, : DONE[row % 3]], paged_cache=view, position_ids=view.position_ids)
    order = sorted(rows, key=lambda r: -DONE[r % 3])  # decode rows longest first
    view = cache.bind_packed([(r, DONE[r % 3]) for r in order], [])
    ids = torch.tensor([[int(seqs[r, DONE[r % 3]]) for r in order]])
    return model(ids, paged_cache=view, position_ids=view.position_ids)[0], view


def _dense(reference: Transformer, seqs: torch.Tensor, rows: list[int]) -> torch.Tensor:
    order = sorted(rows, key=lambda r: -DONE[r % 3])
    with torch.inference_mode():
        return torch.cat([reference(seqs[r : r + 1, : DONE[r % 3] + 1])[0, -1:] for r in order])


@pytest.mark.parametrize("extra", FEATURES.values(), ids=FEATURES)
def test_prepare_model_fuses_gqa_blocks_and_keeps_the_state_dict_names(extra):
    reference = Transformer(_config(**extra)).eval()
    for quantize in ("none", "int8"):
        model = prepare_model(copy.deepcopy(reference), quantize)
        assert all(type(b) is KernelDecoderBlock for b in model.layers)
        unfused = prepare_model(copy.deepcopy(reference), quantize, fuse=False)  # LoRA's form
        assert all(type(b) is DecoderBlock for b in unfused.layers)
        assert model.state_dict().keys() == _blocks_unswapped(reference, quantize).state_dict().keys()


def _blocks_unswapped(reference: Transformer, quantize: str) -> Transformer:
    """The prepared model with its blocks left as they were (block fusion off)."""
    from astrai_serve.kernels import decode_block

    original = decode_block.kernel_block
    decode_block.kernel_block = lambda block: None
    try:
        return prepare_model(copy.deepcopy(reference), quantize)
    finally:
        decode_block.kernel_block = original


def test_mla_blocks_stay_unfused():
    config = _config(attention_type="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    model = prepare_model(Transformer(config).eval(), "none")
    assert all(type(b) is DecoderBlock for b in model.layers)


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("extra", FEATURES.values(), ids=FEATURES)
def test_a_fused_decode_step_equals_the_dense_forward(extra, quantize):
    """fp32: to rounding (`forward_bound`); int8: within its stated error of the float model."""
    torch.manual_seed(0)
    reference = Transformer(_config(**extra)).eval()
    model = prepare_model(copy.deepcopy(reference), quantize)
    seqs = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    logits, view = _decode_step(model, seqs, [0, 1, 2])
    assert view._decode_step is not None  # the fused path ran
    expected = _dense(reference, seqs, [0, 1, 2]).double()
    scale = expected.abs().max().item()
    bound = (forward_bound(2, 96, scale=scale, dtype=torch.float32) if quantize == "none"
             else reduced_precision_bound(2, 96, scale, INT8_STAGE))
    assert (logits.double() - expected).abs().max().item() <= bound


def test_more_rows_than_the_kernel_takes_run_the_block_itself():
    torch.manual_seed(0)
    reference = Transformer(_config()).eval()
    model = prepare_model(copy.deepcopy(reference), "int8")  # the int8 kernel: up to INT8_MAX_ROWS
    rows = list(range(kernels.INT8_MAX_ROWS + 1))
    seqs = torch.randint(0, 64, (len(rows), 40), generator=torch.Generator().manual_seed(1))
    logits, view = _decode_step(model, seqs, rows)
    assert view._decode_step is None  # never bound: every block ran its own forward
    expected = _dense(reference, seqs, rows).double()
    bound = reduced_precision_bound(2, 96, expected.abs().max().item(), INT8_STAGE)
    assert (logits.double() - expected).abs().max().item() <= bound


@torch.inference_mode()
def test_run_decode_layer_declines_what_it_cannot_run_and_writes_nothing():
    model = prepare_model(Transformer(_config()).eval(), "none")
    block = model.layers[0]
    cache = KVCache(model.kv_spec(), 2, page_size=4, max_tokens=64)
    cache.task_alloc(0, list(range(6)))
    cache.task_extend(0, 6)
    view = cache.bind_packed([(0, 5)], [])
    before = cache.storage.k_cache.clone()
    cos, sin = model.rotary_emb(torch.zeros(1), view.position_ids)
    x = torch.randn(1, 1, 64)
    assert view.run_decode_layer(block.kernel_layer, x.double(), (cos, sin)) is None  # dtype
    assert view.run_decode_layer(block.kernel_layer, torch.randn(1, 1, 128)[..., ::2], (cos, sin)) is None  # strided
    wrong_rope = model.rotary_emb.__class__(8, 128)(x, view.position_ids)  # rope dim 8, heads of 16
    assert view.run_decode_layer(block.kernel_layer, x, wrong_rope) is None
    assert torch.equal(cache.storage.k_cache, before)
    assert view.run_decode_layer(block.kernel_layer, x, (cos, sin)).shape == (1, 1, 64)
    assert not torch.equal(cache.storage.k_cache, before)  # this step's key written


def test_the_engine_gives_the_same_greedy_tokens_fused_or_not(model, monkeypatch):
    """The conftest model through the whole engine (paging, batching): fused blocks against the
    same prepared model with block fusion declined by the view."""
    prepared = prepare_model(copy.deepcopy(model), "none")
    assert any(type(b) is KernelDecoderBlock for b in prepared.layers)
    prompts = random_prompts([5, 30, 12], seed=6)
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[EOS_ID])
    with InferenceEngine(prepared) as engine:
        fused = [r.token_ids for r in engine.generate_ids(prompts, params)]
        assert_no_pages_held(engine)
    monkeypatch.setattr(PackedView, "run_decode_layer", lambda self, *args: None)
    with InferenceEngine(prepared) as engine:
        unfused = [r.token_ids for r in engine.generate_ids(prompts, params)]
    assert fused == unfused
