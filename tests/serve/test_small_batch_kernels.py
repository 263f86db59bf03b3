"""`astrai_serve.kernels`: the small-batch CPU kernels equal their references within bounds
derived from fp32 rounding, keep a row's result independent of its batch, and fall back to
torch's kernels, with a reason, wherever they cannot be built."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from astrai_core.model import ModelConfig, RMSNorm, Transformer
from astrai_core.model.cache import KVSpec
from astrai_serve import KVCache, kernels
from astrai_serve.kernels import native
from astrai_serve.kernels.decode_block import KernelDecoderBlock
from astrai_serve.quantize import Int8Linear, KernelRMSNorm, PackedLinear, prepare_model
from tolerances import BF16_STAGE, forward_bound, reduced_precision_bound, reorder_bound

SHAPES = [(37, 29), (64, 96), (200, 768)]  # N, K: tails (N % 24, N % 8, K % 8, K % 32) and none


@pytest.fixture(scope="module")
def small_batch():
    loaded = kernels.load()
    if loaded is None:
        pytest.skip(kernels.status())
    return loaded


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """`load()` as a new process sees it, with an empty cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native._load.cache_clear()
    yield tmp_path / "astrai" / "kernels"
    native._load.cache_clear()


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 16])
def test_f32_linear_is_within_fp32_reordering_of_the_exact_product(small_batch, n, k, rows):
    torch.manual_seed(n + rows)
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    got = small_batch.linear_f32(x, w, b).double()
    expected = F.linear(x.double(), w.double(), b.double())
    scale = (x.double().abs() @ w.double().abs().T).max().item() + b.abs().max().item()
    # Each output: two fp32 computations of a (k + 1)-term sum, each within (k) eps of exact.
    assert (got - expected).abs().max().item() <= 2 * reorder_bound(k + 1, scale, torch.float32)


def test_f32_and_int8_rows_are_bit_identical_alone_or_batched(small_batch):
    torch.manual_seed(0)
    x = torch.randn(16, 96) * torch.tensor([1, 100, 1e-2, 3, 1, 1, 7, 0.5] * 2)[:, None]
    w = torch.randn(64, 96)
    together = small_batch.linear_f32(x, w, None)  # tiles of 4 rows
    assert all(torch.equal(small_batch.linear_f32(x[i : i + 1], w, None)[0], together[i]) for i in range(16))
    assert torch.equal(small_batch.linear_f32(x[[6, 1, 4]].contiguous(), w, None), together[[6, 1, 4]])
    x = x[:8]
    scales = w.abs().amax(1) / 127
    qw = torch.round(w / scales[:, None]).to(torch.int8)
    together = small_batch.linear_q8(x, qw, scales, None)
    assert all(torch.equal(small_batch.linear_q8(x[i : i + 1], qw, scales, None)[0], together[i])
               for i in range(8))


@pytest.fixture(scope="module")
def bf16_kernels(small_batch):
    if not small_batch.bf16:
        pytest.skip("the CPU lacks AVX512-BF16: linear_bf16 cannot run here (its fallback is "
                    "tested by test_without_avx512_bf16_bf16_models_keep_torch_s_kernels)")
    return small_batch


def _bf16_exact(x, w, b):
    """The product on bf16-rounded activations and weights, in float64."""
    expected = F.linear(x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double())
    return expected if b is None else expected + b.double()


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
def test_bf16_linear_is_within_fp32_reordering_of_the_product_of_rounded_values(bf16_kernels, n, k, rows):
    """bf16 x bf16 products are exact in fp32, so only the fp32 sum's order is left: the kernel
    equals the float64 product of the bf16-rounded inputs within fp32 reordering."""
    torch.manual_seed(n * rows)
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    got = bf16_kernels.linear_bf16(x, w.to(torch.bfloat16), b).double()
    expected = _bf16_exact(x, w, b)
    scale = (x.double().abs() @ w.double().abs().T).max().item() + b.abs().max().item()
    assert (got - expected).abs().max().item() <= 2 * reorder_bound(k + 1, scale, torch.float32)


def test_bf16_rows_are_bit_identical_alone_or_batched(bf16_kernels):
    torch.manual_seed(0)
    x = torch.randn(16, 96) * torch.tensor([1, 100, 1e-2, 3, 1, 1, 7, 0.5] * 2)[:, None]
    w = torch.randn(66, 96).to(torch.bfloat16)  # 66: a group's last rows outside the 4-row tiles
    together = bf16_kernels.linear_bf16(x, w, None)
    assert all(torch.equal(bf16_kernels.linear_bf16(x[i : i + 1], w, None)[0], together[i]) for i in range(16))
    assert torch.equal(bf16_kernels.linear_bf16(x[[6, 1, 4]].contiguous(), w, None), together[[6, 1, 4]])


def test_without_avx512_bf16_bf16_models_keep_torch_s_kernels(small_batch, model, monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(native.REQUIRED_CPU_FLAGS))
    assert not small_batch.bf16
    with pytest.raises(RuntimeError, match="needs a CPU with AVX512-BF16"):
        small_batch.linear_bf16(torch.randn(1, 8), torch.randn(4, 8).to(torch.bfloat16), None)
    prepared = prepare_model(copy.deepcopy(model).to(torch.bfloat16), "none")
    assert next(prepared.parameters()).dtype == torch.bfloat16  # no weight-only bf16 here
    assert not any(getattr(m, "weight_only_bf16", False) for m in prepared.modules())


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int8_dot_is_exact_on_the_quantized_values(small_batch, n, k):
    """Integer dots are exact, so the only rounding left is the fp32 rescale: the kernel's x
    quantization (round(x * 127 / max|x|)) redone in torch gives the same integers."""
    torch.manual_seed(k)
    x, w, b = torch.randn(5, k) * 3, torch.randn(n, k), torch.randn(n)
    scales = w.abs().amax(1) / 127
    qw = torch.round(w / scales[:, None]).to(torch.int8)
    peak = x.abs().amax(1, keepdim=True)
    qx = torch.round(x * (127 / peak))
    dot = qx.double() @ qw.double().T  # exact: integers far below 2^53
    expected = (scales[None, :].double() * (peak / 127).double() * dot + b.double())
    got = small_batch.linear_q8(x, qw, scales, b).double()
    # The rescale and the bias: a few fp32 roundings of numbers up to |expected|.
    assert (got - expected).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * expected.abs().max().item()


@pytest.mark.parametrize("k", [29, 64, 768])
def test_rms_norm_matches_the_model_norm(small_batch, k):
    torch.manual_seed(k)
    norm = RMSNorm(k, 1e-6)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    x = torch.randn(2, 3, k) * 5
    expected = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    got = KernelRMSNorm(norm, small_batch)(x)
    assert got.shape == x.shape
    # The k-term sum of squares (k eps relative, halved by the square root) and three products.
    bound = (k / 2 + 3) * torch.finfo(torch.float32).eps * expected.abs()
    assert ((got.double() - expected).abs() <= bound + 1e-30).all()


def test_prepare_model_uses_the_kernels_and_keeps_the_float_output(small_batch, model):
    prepared = prepare_model(copy.deepcopy(model), "none")
    assert not any(type(m) is RMSNorm for m in prepared.modules())
    linears = [m for m in prepared.modules() if isinstance(m, PackedLinear)]
    if linears:  # oneDNN present: its layers carry the small-batch copy for fp32
        assert all(m.weight is not None for m in linears)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected, got = model(ids).double(), prepared(ids).double()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-3 * scale  # fp32 against fp32, reordered


def test_int8_layer_uses_the_kernel_up_to_its_row_limit_and_fbgemm_beyond(small_batch):
    layer = torch.nn.Linear(64, 48)
    q = Int8Linear(layer)
    x = torch.randn(kernels.INT8_MAX_ROWS + 4, 64)
    small = q(x[: kernels.INT8_MAX_ROWS])
    direct = small_batch.linear_q8(x[: kernels.INT8_MAX_ROWS].contiguous(), q.qweight, q.scales, q.bias)
    assert torch.equal(small, direct)
    large = q(x)  # fbgemm: 7-bit activations, within int8 rounding of the kernel's result
    scale = (x.abs() @ layer.weight.detach().abs().T).max().item()
    assert (large[: kernels.INT8_MAX_ROWS] - small).abs().max().item() <= scale * (1 / 127 + 1 / 254)


def test_disabled_by_the_environment(monkeypatch, fresh_load):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert kernels.load() is None
    assert kernels.status() == f"small-batch kernels off ({native.DISABLE_ENV}=0)"
    linear = PackedLinear(torch.nn.Linear(16, 8))  # without kernels: oneDNN only, no copy
    assert linear.weight is None


def test_missing_compiler_falls_back_with_the_reason(monkeypatch, fresh_load):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert kernels.load() is None
    assert "no C compiler found" in kernels.status()
    norm = prepare_model(torch.nn.Sequential(RMSNorm(8)), "none")[0]
    assert type(norm) is RMSNorm  # the model keeps torch's kernels


def test_a_failed_build_leaves_no_file(monkeypatch, fresh_load):
    monkeypatch.setenv("CC", "false")  # a "compiler" that exits 1
    assert kernels.load() is None
    assert "false failed" in kernels.status()
    assert list(fresh_load.iterdir()) == []


def test_a_fresh_build_is_cached_and_reused(fresh_load):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    first = kernels.load()
    if first is None:
        pytest.skip(kernels.status())
    assert [p.name for p in fresh_load.iterdir()] == [first.path.name]
    native._load.cache_clear()
    assert kernels.load().path == first.path  # the cached library, not a second build


MODELS = {
    "gqa-qk-norm-gated": dict(use_qk_norm=True, use_gated_attention=True),
    "mla": dict(attention_type="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16),  # gathers: the kernel step plans its groups on demand
}


@pytest.mark.parametrize("weights", ["f32", "bf16"])
@pytest.mark.parametrize("extra", MODELS.values(), ids=MODELS)
@torch.inference_mode()
def test_a_decode_step_over_the_cached_pages_equals_the_full_forward(small_batch, extra, weights):
    """fp32 decode rows of different lengths on scattered pages, through the prepared model
    (kernel linears, norms and paged decode attention): each row's logits match a dense fp32
    forward of its whole sequence; with bf16 weights (fp32 activations), within bf16's rounding."""
    if weights == "bf16" and not small_batch.bf16:
        pytest.skip("the CPU lacks AVX512-BF16: bf16 models keep torch's kernels there")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=96,
                         max_seq_len=128, **extra)
    reference = Transformer(config).eval()
    model = copy.deepcopy(reference).to(torch.bfloat16 if weights == "bf16" else torch.float32)
    model = prepare_model(model, "none")
    blocks = [m for m in model.modules() if isinstance(m, KernelDecoderBlock)]
    assert all(b.format == (native.BF16 if weights == "bf16" else native.F32) for b in blocks)
    assert len(blocks) == (config.n_layers if config.attention_type != "mla" else 0)
    cache = KVCache(model.kv_spec(), config.n_layers, page_size=4, max_tokens=256)
    seqs = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    done = {0: 33, 1: 7, 2: 18}
    for row in (2, 0, 1):  # allocation order scatters the pages
        cache.task_alloc(row, seqs[row].tolist())
        cache.task_extend(row, done[row] + 1)
        view = cache.bind([row], [0], done[row])
        model(seqs[row : row + 1, : done[row]], paged_cache=view, position_ids=view.position_ids)
    view = cache.bind_packed([(r, done[r]) for r in (0, 2, 1)], [])
    assert view._kernels is not None
    ids = torch.tensor([[int(seqs[r, done[r]]) for r in (0, 2, 1)]])
    logits = model(ids, paged_cache=view, position_ids=view.position_ids)[0]
    expected = torch.cat([reference(seqs[r : r + 1, : done[r] + 1])[0, -1:] for r in (0, 2, 1)])
    width, scale = max(config.dim, config.dim_ffn, 40), expected.abs().max().item()
    if weights == "bf16":
        bound = reduced_precision_bound(config.n_layers, width, scale, BF16_STAGE)
    else:
        bound = forward_bound(config.n_layers, width, scale=scale, dtype=torch.float32)
    assert logits.dtype == torch.float32 and (logits - expected).abs().max().item() <= bound


# (page_size, kv heads, query heads per kv head, head dim): 8-key score blocks and 32-lane value
# blocks with their tails (a page under 8 keys, dims not multiples of 8 or 32, 4 heads a group
# in passes of 3 + 1, one head a group).
LAYOUTS = [(4, 2, 3, 24), (16, 4, 3, 64), (8, 1, 4, 40), (16, 2, 1, 36)]


def _attention_reference(q, k_cache, v_cache, pages, lengths, scale):
    """fp64 SDPA of each row over its gathered pages -> (B, H, Dv)."""
    hkv, d = k_cache.shape[2:]
    out = []
    for b, length in enumerate(lengths.tolist()):
        keys = k_cache[pages[b]].reshape(-1, hkv, d)[:length].transpose(0, 1).double()  # (Hkv, L, D)
        vals = v_cache[pages[b]].reshape(-1, hkv, v_cache.shape[-1])[:length].transpose(0, 1).double()
        qb = q[b].reshape(hkv, -1, d).double()
        out.append(F.scaled_dot_product_attention(qb, keys, vals, scale=scale).reshape(q.shape[1], -1))
    return torch.stack(out)


def _attention_bound(q, k_cache, v_cache, length, scale):
    # Softmax weights sum to 1, so the output's error is that of the scores (a d-term dot,
    # exp's few ulp) times max |v|, plus the L-term weighted sum.
    d = q.shape[-1]
    return (2 * d * (q.abs().max() * k_cache.abs().max()).item() * scale + length + 8) \
        * torch.finfo(torch.float32).eps * v_cache.abs().max().item()


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"page{p}-kv{h}x{r}-d{d}" for p, h, r, d in LAYOUTS])
@pytest.mark.parametrize("rows", [1, 3, 9])  # split-K tasks, or (9 rows) a task per row
def test_paged_decode_attention_equals_sdpa_over_the_gathered_keys(small_batch, rows, layout):
    page_size, hkv, rep, d = layout
    torch.manual_seed(rows)
    k_cache, v_cache = torch.randn(2, 30, page_size, hkv, d).unbind(0)
    n_pages = -(-45 // page_size)
    lengths = torch.tensor([45, 1, 9, 20, 3, 5, 8, 2, 33][:rows]).clamp(max=n_pages * page_size)
    pages = torch.stack([torch.randperm(30)[:n_pages] for _ in range(rows)])
    q = torch.randn(rows, hkv * rep, d)
    got = small_batch.paged_decode_attention(q, k_cache, v_cache, pages, lengths, d**-0.5)
    expected = _attention_reference(q, k_cache, v_cache, pages, lengths, d**-0.5)
    for b, length in enumerate(lengths.tolist()):
        assert (got[b].double() - expected[b]).abs().max().item() <= _attention_bound(q, k_cache, v_cache, length, d**-0.5)


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=["page4-d24", "page16-d64"])
def test_rope_decode_attention_rotates_writes_then_attends(small_batch, layout):
    """The fused call equals RoPE (the model's `apply_rotary`), the cache write, then the paged
    attention; q/k/v are column slices of one fused projection, as in a decode step."""
    from astrai_core.model.rope import RotaryEmbedding, apply_rotary

    page_size, hkv, rep, d = layout
    torch.manual_seed(0)
    rows, h, layers = 3, hkv * rep, 2
    k_cache, v_cache = torch.randn(2, layers, 30, page_size, hkv, d).unbind(0)
    lengths = torch.tensor([21, 1, 9])
    pages = torch.stack([torch.randperm(30)[: -(-21 // page_size)] for _ in range(rows)])
    positions = lengths - 1
    slots = torch.stack([pages[b, p // page_size] * page_size + p % page_size for b, p in enumerate(positions.tolist())])
    qkv = torch.randn(1, rows, (h + 2 * hkv) * d)
    q, k, v = (t.view(1, rows, -1, d) for t in qkv.split([h * d, hkv * d, hkv * d], dim=-1))
    cos, sin = RotaryEmbedding(d, 64)(qkv, positions[None])
    expected_k, expected_v = k_cache[1].clone(), v_cache[1].clone()
    q_rot = apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2)[0]
    k_rot = apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2)[0]
    expected_k.view(-1, hkv, d)[slots], expected_v.view(-1, hkv, d)[slots] = k_rot, v[0]
    splits, scratch = small_batch.attention_scratch(rows, h, d, d, page_size, pages.shape[1])
    untouched = k_cache[0].clone()
    got = small_batch.rope_decode_attention(1, q, k, v, cos, sin, k_cache, v_cache, slots, pages, lengths,
                                            d**-0.5, splits, scratch)
    eps = torch.finfo(torch.float32).eps
    assert torch.equal(k_cache[0], untouched)  # only the given layer
    assert torch.equal(v_cache[1], expected_v)
    assert (k_cache[1] - expected_k).abs().max().item() <= 4 * eps * k.abs().max().item()  # x cos +- y sin
    expected = _attention_reference(q_rot, expected_k, expected_v, pages, lengths, d**-0.5)
    for b, length in enumerate(lengths.tolist()):
        bound = _attention_bound(q_rot, expected_k, expected_v, length, d**-0.5) \
            + 4 * eps * q.abs().max().item() * d * d**-0.5 * expected_v.abs().max().item()  # rotated q's rounding
        assert (got[b].double() - expected[b]).abs().max().item() <= bound


@torch.inference_mode()
def test_rope_write_attend_declines_a_layout_it_cannot_run_and_writes_nothing(small_batch):
    """The view answers None, so GQA runs RoPE, the write and the attention itself."""
    cache = KVCache(KVSpec(2, 8, 2, 8), 1, page_size=4, max_tokens=64)
    cache.task_alloc(0, list(range(6)))
    cache.task_extend(0, 6)
    view = cache.bind_packed([(0, 5)], [])
    before = cache.storage.k_cache.clone()
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    cos, sin = torch.ones(1, 1, 8), torch.zeros(1, 1, 8)
    strided = torch.randn(1, 1, 8, 4).transpose(2, 3)  # heads not one contiguous run
    assert view.rope_write_attend(0, strided, k, v, cos, sin, None) is None
    assert view.rope_write_attend(0, q, k, v, torch.ones(1, 1, 6), torch.zeros(1, 1, 6), None) is None  # rope dim
    assert torch.equal(cache.storage.k_cache, before)
    assert view.rope_write_attend(0, q, k, v, cos, sin, None).shape == (1, 1, 4, 8)
    small = view._scratch.numel()  # a layer with more query heads gets a bigger scratch
    assert view.rope_write_attend(0, torch.randn(1, 1, 8, 8), k, v, cos, sin, None).shape == (1, 1, 8, 8)
    assert view._scratch.numel() > small


def test_a_damaged_cached_library_falls_back_and_names_the_file(monkeypatch, fresh_load):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    fresh_load.mkdir(parents=True)
    damaged = fresh_load / "small_batch-damaged.so"  # a new path: dlopen has not seen it
    damaged.write_bytes(b"not a shared library")
    monkeypatch.setattr(native, "_cached_build", lambda compiler: damaged)
    assert kernels.load() is None
    assert f"could not load {damaged}" in kernels.status() and "delete it to rebuild" in kernels.status()
