"""Training a mixture-of-experts model: the auxiliary-loss-free bias update follows the logged
expert loads step by step, the auxiliary balance loss enters the gradient exactly as its formula
says, the biases travel in checkpoints so resume is bit-identical (and would not be without
them), activation checkpointing counts every token once, and misuse fails with one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from train_helpers import micro_model, resume_config

from astrai_core import Checkpoint, moe_layers
from astrai_core.model.moe import Router
from astrai_train import TrainCallback, TrainConfig, Trainer
from tolerances import forward_bound, reorder_bound

MOE = dict(n_experts=4, n_experts_per_token=2, dim_expert=16, n_shared_experts=1)
RATE = 0.01
COMMON = dict(progress=False, device="cpu", log_interval=1, scheduler="constant", seed=3)


def moe_model(seed: int = 0, **overrides) -> torch.nn.Module:
    return micro_model(seed, **{**MOE, **overrides}).double()


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def _biases(model: torch.nn.Module) -> list[torch.Tensor]:
    return [layer.gate.e_score_correction_bias.clone() for layer in moe_layers(model)]


def test_bias_update_follows_the_logged_expert_loads(seq_dataset, tmp_path):
    model = moe_model()
    config = TrainConfig(model=model, dataset=seq_dataset, out=str(tmp_path), batch_size=2,
                         accumulation_steps=2, max_steps=5, moe_bias_update_rate=RATE, **COMMON)
    Trainer(config).train()
    records = _records(tmp_path)
    expected = [torch.zeros(4, dtype=torch.float64) for _ in range(2)]
    for record in records:
        loads = torch.tensor(record["moe_tokens_per_expert"])  # (layers, experts)
        # Every token of the step's window (2 x 2 samples of 16) took 2 slots in each layer.
        assert loads.sum(-1).tolist() == [2 * 2 * 16 * 2] * 2
        ratio = loads.min(-1).values.double() / loads.max(-1).values
        assert record["moe_load_min_max"] == pytest.approx(ratio.mean().item())
        assert record["moe_load_min_max_worst"] == pytest.approx(ratio.min().item())
        for bias, load in zip(expected, loads.double(), strict=True):
            bias += torch.sign(load.mean() - load) * RATE
    got = _biases(model)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert any(bool(b.any()) for b in got)  # the loads were unequal: the biases moved


def test_bias_update_rate_zero_keeps_the_routing(seq_dataset, tmp_path):
    model = moe_model()
    Trainer(TrainConfig(model=model, dataset=seq_dataset, out=str(tmp_path), batch_size=2,
                        max_steps=3, moe_bias_update_rate=0.0, **COMMON)).train()
    assert not any(bool(b.any()) for b in _biases(model))


class _Grads(TrainCallback):
    """The gradients of the step's window, before clipping and the update."""

    def on_step_begin(self, ctx):
        self.grads = {n: p.grad.clone() for n, p in ctx.raw_model.named_parameters()}


def _manual_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                  coef: float) -> dict[str, torch.Tensor]:
    """Cross entropy + coef * the mean over MoE layers of E * sum_i f_i P_i, from each router's
    input alone: scores, top-k by score + bias, shares f, mean normalised scores P."""
    inputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0])))
             for m in model.modules() if isinstance(m, Router)]
    model.train()
    logits = model(ids)
    for hook in hooks:
        hook.remove()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    aux = []
    for router, x in inputs:
        scores = torch.sigmoid(x @ router.weight.T) if router.scoring == "sigmoid" else \
            torch.softmax(x @ router.weight.T, -1)
        chosen = (scores + router.e_score_correction_bias).topk(router.top_k, -1).indices
        share = torch.zeros(router.n_experts, dtype=scores.dtype)
        share.index_add_(0, chosen.flatten(), torch.ones(chosen.numel(), dtype=scores.dtype))
        share /= chosen.numel()
        probs = (scores / scores.sum(-1, keepdim=True)).mean(0)
        aux.append(router.n_experts * (share * probs).sum())
    (loss + coef * torch.stack(aux).mean()).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_aux_loss_enters_the_gradient_as_its_formula_says(seq_dataset, tmp_path, coef):
    model = moe_model(router_scoring="sigmoid")
    start = copy.deepcopy(model)
    data = Subset(seq_dataset, range(4))  # one batch of all 4 samples: order does not matter
    grads = _Grads()
    Trainer(TrainConfig(model=model, dataset=data, out=str(tmp_path), batch_size=4, max_steps=1,
                        max_grad_norm=0.0, moe_aux_loss_coef=coef, **COMMON),
            callbacks=[grads]).train()
    items = [data[i] for i in range(4)]
    ids = torch.stack([torch.as_tensor(it["input_ids"]) for it in items])
    labels = torch.stack([torch.as_tensor(it["labels"]) for it in items])
    want = _manual_grads(start, ids, labels, coef)
    # float64: a sum over 64 tokens of products through 2 blocks of width <= 64 (train_helpers).
    bound = reorder_bound(64 * 64 * 2, scale=10.0)
    for name, grad in want.items():
        assert (grads.grads[name] - grad).abs().max().item() <= bound, name
    if coef:  # and the term is not negligible: without it the router gradient differs
        plain = _manual_grads(copy.deepcopy(start), ids, labels, 0.0)
        name = "layers.0.mlp.gate.weight"
        assert (plain[name] - want[name]).abs().max().item() > 1e3 * bound
        assert "moe_aux_loss" in _records(tmp_path)[0]


def test_activation_checkpointing_counts_each_token_once(seq_dataset, tmp_path):
    runs = {}
    for checkpointing in (False, True):
        model = moe_model()
        out = tmp_path / str(checkpointing)
        Trainer(TrainConfig(model=model, dataset=seq_dataset, out=str(out), batch_size=2,
                            accumulation_steps=2, max_steps=3, moe_aux_loss_coef=0.1,
                            activation_checkpointing=checkpointing, **COMMON)).train()
        runs[checkpointing] = ([r["moe_tokens_per_expert"] for r in _records(out)], _biases(model))
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1], strict=True))


def test_resume_is_bit_identical_with_the_expert_biases(seq_file, tmp_path):
    def config(out, **overrides):
        return resume_config(seq_file, out, model=moe_model(), moe_bias_update_rate=RATE,
                             moe_aux_loss_coef=0.01, **overrides)

    reference = Trainer(config(tmp_path / "a")).train()
    Trainer(config(tmp_path / "b", max_steps=3)).train()
    checkpoint = Checkpoint.load(tmp_path / "b" / "step_00000003")
    saved = {k: v for k, v in checkpoint.state_dict.items() if k.endswith("e_score_correction_bias")}
    assert len(saved) == 2 and any(bool(v.any()) for v in saved.values())  # they travel, moved
    resumed = Trainer(config(tmp_path / "b")).train(checkpoint)
    want, got = reference.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # The logged loads and balance of every step too (timings aside).
    def logged(out):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                for r in _records(out)]

    assert logged(tmp_path / "b") == logged(tmp_path / "a")


def test_resume_without_the_saved_biases_diverges(seq_file, tmp_path):
    """Control: the biases matter, so the exact resume above is not vacuous."""
    def config(out, **overrides):
        return resume_config(seq_file, out, model=moe_model(), moe_bias_update_rate=RATE,
                             **overrides)

    reference = Trainer(config(tmp_path / "a")).train()
    Trainer(config(tmp_path / "b", max_steps=3)).train()
    checkpoint = Checkpoint.load(tmp_path / "b" / "step_00000003")
    for name, tensor in checkpoint.state_dict.items():
        if name.endswith("e_score_correction_bias"):
            tensor.zero_()
    resumed = Trainer(config(tmp_path / "b")).train(checkpoint)
    want, got = reference.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert not all(torch.equal(want[k], got[k]) for k in want)


def test_the_aux_loss_needs_a_mixture_of_experts_model(seq_dataset, tmp_path):
    config = TrainConfig(model=micro_model(0), dataset=seq_dataset, out=str(tmp_path),
                         max_steps=1, moe_aux_loss_coef=0.01, **COMMON)
    with pytest.raises(ValueError, match=r"--moe-aux-loss-coef .* this model has none"):
        Trainer(config).train()


@pytest.mark.parametrize(("field", "value"), [("moe_bias_update_rate", -1e-3),
                                              ("moe_aux_loss_coef", -0.1)])
def test_negative_balancing_values_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be a number >= 0"):
        TrainConfig(**{field: value})


def test_lora_on_a_moe_model_keeps_the_base_routing(seq_dataset, tmp_path):
    model = moe_model()
    Trainer(TrainConfig(model=model, dataset=seq_dataset, out=str(tmp_path), batch_size=2,
                        max_steps=3, lora_rank=4, **COMMON)).train()
    assert not any(bool(b.any()) for b in _biases(model))  # the base's biases stay as loaded
    assert all(not layer.experts.gate_up_proj.requires_grad for layer in moe_layers(model))


def test_a_moe_model_trains_and_serves_from_its_checkpoint(seq_dataset, tmp_path):
    """The checkpoint folder is a model folder: it loads with its biases and runs."""
    model = moe_model()
    Trainer(TrainConfig(model=model, dataset=seq_dataset, out=str(tmp_path), batch_size=2,
                        max_steps=2, ckpt_interval=2, **COMMON)).train()
    from astrai_core import AutoModel

    loaded = AutoModel.from_pretrained(tmp_path / "step_00000002", dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(_biases(loaded), _biases(model), strict=True))
    ids = torch.randint(5, 64, (1, 8))
    with torch.no_grad():
        a, b = loaded(ids), model.eval()(ids)
    # Same weights, but the loaded copy's expert tensors sit in other memory, so GEMM blocking
    # may round differently: bound by the decoder's rounding, not bitwise.
    bound = forward_bound(n_layers=2, width=32, scale=b.abs().max().item())
    assert (a - b).abs().max().item() <= bound
