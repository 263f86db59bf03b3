"""Serving weights (`astrai_serve.quantize`): oneDNN-packed float layers give the float model's
greedy output; int8 and bf16 stay within stated bounds of it; the choice of dtype is by
capability, never by assumption."""

from __future__ import annotations

import contextlib
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from serve_helpers import EOS_ID, VOCAB, assert_no_pages_held, random_prompts

from astrai_core.model import Linear
from astrai_serve import InferenceEngine, SamplingParams
from astrai_serve.api.loader import EngineOptions, load_engine, serving_dtype
from astrai_serve.quantize import Int8Linear, PackedLinear, prepare_model, weight_bytes
from tolerances import BF16_STAGE, INT8_STAGE, reduced_precision_bound, reorder_bound

GREEDY = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[EOS_ID])


def _linear(n_out: int, n_in: int, bias: bool, seed: int) -> Linear:
    torch.manual_seed(seed)
    layer = Linear(n_in, n_out, bias)
    layer.reset_parameters(0.2)
    if bias:
        torch.nn.init.normal_(layer.bias, 0, 0.5)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_error_is_within_its_rounding_bound(bias):
    layer = _linear(48, 96, bias, seed=1)
    x = torch.randn(7, 96) * torch.tensor([1, 1e-3, 30, 1, 5, 0.1, 2])[:, None]  # rows far apart
    q = Int8Linear(layer)
    got = q(x).double()
    w, xd = layer.weight.double(), x.double()
    expected = F.linear(xd, w, None if layer.bias is None else layer.bias.double())
    peak_w = w.abs().amax(1)  # (N,)
    peak_x = xd.abs().amax(1, keepdim=True)  # (M, 1)
    # Per output: sum_k |x_k| |dw| + |w_k| |dx| + |dx| |dw|, the rounding bounds of the comment.
    bound = (xd.abs().sum(1, keepdim=True) * peak_w / 254
             + w.abs().sum(1) * peak_x / 127 * 1.001  # 0.1%: the kernel's fp32 scale rounding
             + 96 * peak_x / 127 * peak_w / 254)
    bound += reorder_bound(96, scale=(xd.abs() @ w.abs().T).max().item(), dtype=torch.float32)
    assert ((got - expected).abs() <= bound).all()


def test_int8_rows_do_not_depend_on_the_rest_of_the_batch():
    """Activation ranges are per row: a row's output is bit-identical alone or in any batch."""
    q = Int8Linear(_linear(40, 64, True, seed=2))
    x = torch.randn(6, 64) * torch.tensor([1, 100, 1e-2, 3, 1, 1])[:, None]
    together = q(x)
    alone = torch.cat([q(x[i : i + 1]) for i in range(6)])
    assert torch.equal(together, alone)
    assert torch.equal(q(x[[5, 0, 2]]), together[[5, 0, 2]])


def test_int8_linear_works_inside_and_outside_inference_mode():
    """Its scratch buffer is made under the engine's inference_mode; a later plain call (an
    evaluation under no_grad) must not trip over it, nor the reverse."""
    q = Int8Linear(_linear(16, 32, False, seed=4))
    x = torch.randn(3, 32)
    with torch.inference_mode():
        a = q(x)
    with torch.no_grad():
        b = q(x)
    with torch.inference_mode():
        c = q(x)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_packed_float_linear_matches_the_plain_one():
    layer = _linear(80, 96, True, seed=3)
    if not PackedLinear.supported(torch.nn.Sequential(layer)):
        pytest.skip("this torch has no oneDNN linear")
    x = torch.randn(5, 3, 96)
    expected = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    got = PackedLinear(layer)(x)
    assert got.shape == (5, 3, 80)
    scale = (x.double().abs() @ layer.weight.double().abs().T).max().item()
    assert (got.double() - expected).abs().max().item() <= reorder_bound(96, scale, torch.float32)


def test_prepare_swaps_every_linear_layer_and_keeps_the_original_model_code(model):
    quantized = prepare_model(copy.deepcopy(model), "int8")
    kinds = {type(m) for m in quantized.modules()}
    assert Linear not in kinds and Int8Linear in kinds
    assert isinstance(quantized.lm_head, Int8Linear)
    # A quarter of the float bytes for the matrices (plus one fp32 scale per row).
    assert weight_bytes(quantized) < 0.3 * weight_bytes(model)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        prepare_model(copy.deepcopy(model), "int4")


def _teacher_forced_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double()  # (T, vocab)


def _check_against_float(model, reduced, stage_error: float) -> float:
    """Logits within `reduced_precision_bound`; the top-1 token equal wherever the float model's
    margin exceeds twice that bound (no flip is possible there). Returns the top-1 agreement."""
    ids = random_prompts([96], seed=4)[0]
    ref, got = _teacher_forced_logits(model, ids), _teacher_forced_logits(reduced, ids)
    config = model.config
    bound = reduced_precision_bound(config.n_layers, max(config.dim, config.dim_ffn),
                                    ref.abs().max().item(), stage_error)
    assert (got - ref).abs().max().item() <= bound
    top2 = ref.topk(2, dim=-1).values
    safe = (top2[:, 0] - top2[:, 1]) > 2 * bound
    agree = ref.argmax(-1) == got.argmax(-1)
    assert agree[safe].all()
    return agree.double().mean().item()


def test_int8_logits_and_greedy_tokens_stay_close_to_float(model):
    quantized = prepare_model(copy.deepcopy(model), "int8")
    agreement = _check_against_float(model, quantized, INT8_STAGE)
    assert agreement >= 0.5  # a sanity floor: most positions have margins above the bound
    with InferenceEngine(quantized) as engine:  # the whole engine runs on the swapped layers
        prompts = random_prompts([5, 30, 12], seed=6)
        results = engine.generate_ids(prompts, GREEDY)
        assert all(r.generated_tokens > 0 for r in results)
        assert_no_pages_held(engine)


def test_bf16_logits_and_greedy_tokens_stay_close_to_float(model):
    """The bf16 path runs here whatever the CPU (emulated where not native): numerics only."""
    reduced = prepare_model(copy.deepcopy(model).to(torch.bfloat16), "none")
    agreement = _check_against_float(model, reduced, BF16_STAGE)
    assert agreement >= 0.5


def test_packed_float_engine_gives_the_float_engine_s_greedy_output(model):
    prompts = random_prompts([3, 17, 40, 9], seed=5)
    with InferenceEngine(model) as engine:
        expected = [r.token_ids for r in engine.generate_ids(prompts, GREEDY)]
    packed = prepare_model(copy.deepcopy(model), "none")
    with InferenceEngine(packed) as engine:
        got = [r.token_ids for r in engine.generate_ids(prompts, GREEDY)]
    assert got == expected


def test_auto_dtype_is_bf16_only_where_native(monkeypatch):
    monkeypatch.setenv("ASTRAI_CPU_BF16", "0")
    assert serving_dtype(None, "cpu") == "float32"
    assert serving_dtype("auto", "cpu") == "float32"
    monkeypatch.setenv("ASTRAI_CPU_BF16", "1")
    assert serving_dtype(None, "cpu") == "bfloat16"
    assert serving_dtype("float32", "cpu") == "float32"  # an explicit dtype always wins
    assert serving_dtype(None, "cuda") is None  # the stored dtype on GPU


def _servable_copy(hf_folder, tokenizer, tmp_path):
    """The shared fixture folder plus a tokenizer, in a folder of this test's own."""
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_engine_quantizes_before_the_engine_starts(hf_folder, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRAI_CPU_BF16", "0")
    folder = _servable_copy(hf_folder, tokenizer, tmp_path)
    with load_engine(folder, EngineOptions(quantize="int8", max_batch_size=2)) as engine:
        assert isinstance(engine.model.lm_head, Int8Linear)
        assert next(engine.model.parameters()).dtype == torch.float32
        out = engine.generate_ids([[5, 6, 7]], GREEDY)[0]
        assert out.generated_tokens > 0
    with pytest.raises(ValueError, match="unknown --quantize 'int4'"):
        EngineOptions(quantize="int4")


def test_generate_cli_refuses_an_unknown_quantization_in_one_line(hf_folder, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from astrai_core.cli.main import app

    folder = _servable_copy(hf_folder, tokenizer, tmp_path)
    result = CliRunner().invoke(app, ["generate", str(folder), "-p", "hi", "--quantize", "int4"])
    assert isinstance(result.exception, ValueError)
    assert "unknown --quantize 'int4'; choose one of: none, int8" in str(result.exception)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_mla_keeps_the_layer_its_cached_decode_reads_and_serves_in_every_mode(quantize):
    """MLA's absorbed decode reads kv_b_proj's weight itself: the swap leaves that layer alone,
    so int8 and the oneDNN layers (with or without the kernels) serve it."""
    from astrai_core.model import ModelConfig, Transformer
    from astrai_serve import kernels

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, dim_ffn=96,
                         max_seq_len=128, attention_type="mla", kv_lora_rank=24, qk_nope_head_dim=16,
                         qk_rope_head_dim=8, v_head_dim=16)
    reference = Transformer(config).eval()
    prompts = random_prompts([5, 20], seed=3)
    with InferenceEngine(reference) as engine:
        expected = [r.token_ids for r in engine.generate_ids(prompts, GREEDY)]
    for ctx in (contextlib.nullcontext(), kernels.disabled()):
        with ctx:
            model = prepare_model(copy.deepcopy(reference), quantize)
            assert type(model.layers[0].self_attn.kv_b_proj) is Linear
            with InferenceEngine(model) as engine:
                got = [r.token_ids for r in engine.generate_ids(prompts, GREEDY)]
                assert_no_pages_held(engine)
        if quantize == "none":
            assert got == expected  # the same fp32 products, reordered: no greedy flip here
        else:
            assert all(len(g) > 0 for g in got)
