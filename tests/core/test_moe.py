"""The mixture-of-experts feed-forward: equal to a naive per-token reference (outputs and
gradients), only the chosen experts computed, grouped by expert; the router's scoring, bias and
balance loss against hand computations; config validation; presets; cached decode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from astrai_core.model import ModelConfig, MoE, Transformer, active_parameters, get_preset
from astrai_core.model import moe as moe_module
from astrai_core.model.moe import balance_loss, grouped_mm_supported
from tolerances import forward_bound, reorder_bound

DIM, E = 24, 6
BASE = dict(vocab_size=97, dim=DIM, n_layers=3, dim_ffn=40, n_heads=4, n_kv_heads=2,
            max_seq_len=64, use_qk_norm=True)
MOE = dict(n_experts=E, n_experts_per_token=2, dim_expert=12, n_shared_experts=1,
           n_dense_layers=1)


def make_block(seed: int = 0, **fields) -> MoE:
    config = ModelConfig(**{**BASE, **MOE, **fields})
    torch.manual_seed(seed)
    block = MoE(config).double()
    with torch.no_grad():  # weights large enough that every expert's output matters
        for p in block.parameters():
            p.normal_(0.0, 0.5)
        block.gate.e_score_correction_bias.normal_(0.0, 0.2)  # selection differs from scores
    return block


def naive_moe(block: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, in plain Python: score every expert, rank by score + bias, weight the
    k best by their scores, run those experts' SwiGLU from their slices of the stacked weights."""
    gate, experts = block.gate, block.experts
    dim_expert, out = experts.dim_expert, []
    for token in x.reshape(-1, x.shape[-1]):
        logits = gate.weight @ token
        scores = torch.softmax(logits, 0) if gate.scoring == "softmax" else torch.sigmoid(logits)
        bias = gate.e_score_correction_bias
        ranked = sorted(range(gate.n_experts), key=lambda e: (scores[e] + bias[e]).item(), reverse=True)
        chosen = ranked[: gate.top_k]
        weights = [scores[e] for e in chosen]
        if gate.norm_topk_prob:
            total = sum(weights)
            weights = [w / total for w in weights]
        y = torch.zeros_like(token)
        for e, w in zip(chosen, weights, strict=True):
            g = experts.gate_up_proj[e, :dim_expert] @ token
            u = experts.gate_up_proj[e, dim_expert:] @ token
            y = y + w * (experts.down_proj[e] @ (F.silu(g) * u))
        if block.shared_experts is not None:
            y = y + block.shared_experts(token)
        out.append(y)
    return torch.stack(out).view(x.shape)


SCORINGS = {
    "softmax-normalised": dict(router_scoring="softmax", norm_topk_prob=True),
    "softmax-raw": dict(router_scoring="softmax", norm_topk_prob=False),
    "sigmoid-normalised": dict(router_scoring="sigmoid", norm_topk_prob=True),
    "sigmoid-top3-no-shared": dict(router_scoring="sigmoid", n_experts_per_token=3,
                                   n_shared_experts=0),
}
# float64, so the bound (two matmul stages of width <= DIM, each output at most ~|x| |w| sums)
# is ~1e-13: far below any routing or weighting defect, far above reordering noise.
BOUND = reorder_bound(4 * DIM, scale=50.0)


@pytest.mark.parametrize("name", list(SCORINGS))
def test_moe_equals_a_naive_per_token_reference(name):
    block = make_block(**SCORINGS[name])
    x = torch.randn(3, 7, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert (block(x) - naive_moe(block, x)).abs().max().item() <= BOUND


def test_moe_gradients_equal_the_naive_reference():
    block = make_block()
    x = torch.randn(2, 9, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.randn_like(x)
    grads = []
    for fn in (block, lambda t: naive_moe(block, t)):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        (fn(xi) * target).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in block.parameters()])
    for got, want in zip(*grads, strict=True):
        assert (got - want).abs().max().item() <= BOUND


def test_experts_nobody_chose_are_never_computed():
    """Expert 0 is never selected (a large negative bias) and its weights are NaN: a dense
    computation masked afterwards would spread NaN (0 * NaN); computing the chosen ones only
    does not."""
    block = make_block()
    with torch.no_grad():
        block.gate.e_score_correction_bias[0] = -1e3
        block.experts.gate_up_proj[0] = float("nan")
        block.experts.down_proj[0] = float("nan")
    x = torch.randn(4, 5, DIM, dtype=torch.float64)
    assert torch.isfinite(block(x)).all()


def test_tokens_are_grouped_by_expert_not_looped_one_by_one(monkeypatch):
    """Whatever the number of tokens, one router matmul and two matmuls per expert that got
    tokens (the shared expert is one MLP of three)."""
    calls = []
    real = F.linear

    def counting(x, w, b=None):
        calls.append(x.shape[0] if x.dim() > 1 else 1)
        return real(x, w, b)

    monkeypatch.setattr(moe_module.F, "linear", counting)
    block = make_block(n_shared_experts=0)
    for n_tokens in (5, 300):
        calls.clear()
        x = torch.randn(n_tokens, DIM, dtype=torch.float64)
        block(x)
        assert len(calls) <= 1 + 2 * E
        # The router sees each token once, gate_up and down each of its 2 slots once.
        assert sum(calls) == n_tokens + 2 * 2 * n_tokens


def test_grouped_matmul_path_equals_the_loop():
    """`torch._grouped_mm` runs where the device has it (CUDA, bf16); its forward also runs on
    CPU in fp32, so the same operands prove the layout it is given (weights transposed per
    expert, offsets at each expert's end)."""
    if moe_module._GROUPED_MM is None:
        pytest.skip("this torch has no torch._grouped_mm (torch < 2.8)")
    block = make_block().float()
    experts = block.experts
    counts = torch.tensor([5, 0, 3, 8, 1, 7])
    routed = torch.randn(int(counts.sum()), DIM)
    try:
        grouped = experts._grouped(routed, counts)
    except RuntimeError as exc:  # CPU kernels of this torch build may be missing
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {exc}")
    looped = experts._looped(routed, counts)
    assert (grouped - looped).abs().max().item() <= forward_bound(
        1, 2 * DIM, scale=looped.abs().max().item(), dtype=torch.float32)
    assert not grouped_mm_supported(routed, experts.gate_up_proj, experts.down_proj)  # CPU: loop


def test_router_scores_bias_and_weights_by_hand():
    block = make_block(router_scoring="sigmoid", n_experts_per_token=2)
    gate = block.gate
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 0.2], dtype=torch.float64)
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.9, 0, 0, 0]))
    x = torch.zeros(1, DIM, dtype=torch.float64)
    x[0, 0] = 1.0
    weights, experts, scores = gate(x)
    s = [1 / (1 + math.exp(-v)) for v in (2.0, 1.0, 0.0, -1.0, 0.5, 0.2)]
    # scores + bias: 0.881, 0.731, 0.5 + 0.9 = 1.4, ... -> experts 2 then 0, weighted by s alone
    assert experts.tolist() == [[2, 0]]
    assert weights[0].tolist() == pytest.approx([s[2] / (s[2] + s[0]), s[0] / (s[2] + s[0])])
    assert scores[0].tolist() == pytest.approx(s)


def test_bias_update_is_the_sign_of_the_load_gap():
    block = make_block()
    gate = block.gate
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
    gate.update_bias(torch.tensor([3, 1, 2, 2, 0, 4]), rate=0.01)  # mean 2
    assert gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0.01, -0.01])


def test_balance_loss_is_one_when_balanced_and_matches_a_hand_computation():
    uniform = torch.full((8, 4), 0.25, dtype=torch.float64)
    assert balance_loss(uniform, torch.tensor([4, 4, 4, 4]), top_k=2).item() == pytest.approx(1.0)
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]], dtype=torch.float64)
    counts = torch.tensor([2, 1, 1])  # top-2 of each token: {0, 1}, {0, 2} say
    f = [2 / 4, 1 / 4, 1 / 4]
    p = [0.65, 0.25, 0.1]
    assert balance_loss(scores, counts, top_k=2).item() == pytest.approx(3 * sum(a * b for a, b in zip(f, p, strict=True)))


def test_training_forwards_count_tokens_per_expert_and_eval_does_not():
    block = make_block()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    block.eval()
    block(x)
    assert block.take_stats() == (None, None)
    block.train()
    block(x)
    block(x[:1])
    load, aux = block.take_stats()
    assert int(load.sum()) == (10 + 5) * 2 and aux is None
    block.aux_loss_enabled = True
    block(x)
    _, aux = block.take_stats()
    assert aux is not None and aux.requires_grad
    with torch.no_grad():
        block(x)
    assert block.take_stats() == (None, None)


def test_dense_layers_lead_and_the_rest_have_experts():
    model = Transformer(ModelConfig(**BASE, **MOE))
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "MoE", "MoE"]
    assert model.layers[1].mlp.shared_experts.gate_proj.weight.shape == (12, DIM)


# -- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "message"), [
    (dict(n_experts=4, n_experts_per_token=5, dim_expert=8), r"n_experts_per_token must be between 1 and n_experts \(4\)"),
    (dict(n_experts=4, n_experts_per_token=0, dim_expert=8), "n_experts_per_token must be between"),
    (dict(n_experts=4, n_experts_per_token=2), r"dim_expert \(the SwiGLU inner size"),
    (dict(n_experts=4, n_experts_per_token=2, dim_expert=8, n_dense_layers=3), r"n_dense_layers \(3\) must be below n_layers \(3\)"),
    (dict(n_experts=-1), "n_experts must be a non-negative integer"),
    (dict(n_experts=4, n_experts_per_token=2, dim_expert=8, router_scoring="relu"), "router_scoring must be 'softmax' or 'sigmoid'"),
    (dict(n_shared_experts=1), "n_shared_experts is set but n_experts is 0"),
    (dict(dim_expert=64), "dim_expert is set but n_experts is 0"),
    (dict(n_experts=4, n_experts_per_token=2, dim_expert=8, mlp_bias=True), "mlp_bias is not supported with experts"),
    (dict(n_experts=4, n_experts_per_token=2, dim_expert=8, norm_topk_prob="yes"), "norm_topk_prob must be true or false"),
])
def test_invalid_moe_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, **fields})


def test_dense_configs_are_written_as_before_and_moe_configs_round_trip(tmp_path):
    dense = ModelConfig(**BASE)
    assert not set(dense.to_dict()) & {"n_experts", "dim_expert", "router_scoring"}
    old_file = {k: v for k, v in dense.to_dict().items()}  # what earlier releases wrote
    assert ModelConfig.from_dict(old_file) == dense and not dense.is_moe
    moe = ModelConfig(**BASE, **MOE, router_scoring="sigmoid")
    moe.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == moe


def test_moe_presets_and_their_active_parameters():
    def counts(name):
        config = get_preset(name)
        with torch.device("meta"):
            total = Transformer(config).num_parameters()
        return total, active_parameters(config, total)

    small_total, small_active = counts("small")
    total, active = counts("small-moe")
    config = get_preset("small-moe")
    routers = 5 * config.n_experts * config.dim  # the only extra a token runs through
    assert active == small_active + routers and total > 2 * small_total
    total, active = counts("1b-moe")
    assert 0.9e9 <= total <= 1.1e9 and 0.4e9 <= active <= 0.5e9


def test_cached_decode_equals_the_full_forward():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, **MOE, init_std=0.2)).double().eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 16)
        steps, start = [], 0
        for size in (5, 1, 1, 3, 1, 1):  # a prefill chunk, decode steps, another chunk
            cache.begin(torch.ones(2, size, dtype=torch.bool))
            pos = torch.arange(start, start + size).expand(2, size)
            steps.append(model(ids[:, start:start + size], paged_cache=cache, position_ids=pos))
            start += size
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= forward_bound(3, 40, scale=full.abs().max().item())
