"""Optimizers and schedules for short runs: Muon (with AdamW for the token tables, norms and
biases) learns, resumes bit-identically, and refuses what it cannot do; WSD holds the peak rate
and decays at the end."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import DropoutLM, micro_model, resume_config

from astrai_core import Checkpoint
from astrai_train import TrainCallback, TrainConfig, Trainer, find_latest_checkpoint
from astrai_train.optim import (
    HybridOptimizer,
    Muon,
    build_optimizer,
    is_hidden_matrix,
    orthogonalize,
)
from astrai_train.schedulers import WSDScheduler


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = micro_model()
    optimizer = build_optimizer(TrainConfig(optimizer="muon"), model)
    assert isinstance(optimizer, HybridOptimizer) and set(optimizer.parts) == {"muon", "adamw"}
    muon = {id(p) for g in optimizer.parts["muon"].param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon) == is_hidden_matrix(name, p), name
    assert id(model.embed_tokens.weight) not in muon and id(model.layers[0].mlp.up_proj.weight) in muon
    # The schedule's groups are the parts' own: a rate set on one is the rate the part uses.
    optimizer.param_groups[0]["lr"] = 0.123
    assert optimizer.parts["muon"].param_groups[0]["lr"] == 0.123


def _bigram_stream(tmp_path) -> object:
    """A learnable stream: each token determines the next (a fixed permutation of 59 tokens)."""
    import numpy as np

    from astrai_data import DatasetFactory, save_h5

    tokens = [5]
    for _ in range(3999):
        tokens.append((tokens[-1] * 7 + 3) % 59 + 5)
    path = save_h5(tmp_path / "bigram.h5", "seq", {"sequence": np.array(tokens)})
    return DatasetFactory.load("seq", path, window_size=16)


def test_muon_lowers_the_loss_of_a_tiny_model(make_config, tmp_path):
    context = Trainer(make_config(model=micro_model(0), dataset=_bigram_stream(tmp_path),
                                  optimizer="muon", learning_rate=1e-2, max_steps=25,
                                  out=str(tmp_path / "run"))).train()
    # From ln(64) ~ 4.16 for random weights; the stream is deterministic, so the loss can go to 0.
    assert context.loss < 0.25 * math.log(64)


def test_a_muon_step_is_muon_on_the_matrices_and_adamw_on_the_rest(make_config, tmp_path):
    """The trainer's step against the two optimizers applied by hand to the same gradients:
    the same kernels in the same order, so the weights are equal bit for bit."""
    seen = {}

    class Snapshot(TrainCallback):
        def on_step_begin(self, ctx):
            seen["params"] = {n: p.detach().clone() for n, p in ctx.raw_model.named_parameters()}
            seen["grads"] = {n: p.grad.detach().clone() for n, p in ctx.raw_model.named_parameters()}

    model = micro_model(0, tie_weight=False)
    lr, wd = 1e-2, 0.1
    Trainer(make_config(model=model, dataset=_bigram_stream(tmp_path), optimizer="muon",
                        learning_rate=lr, weight_decay=wd, max_grad_norm=0.0, max_steps=1,
                        out=str(tmp_path / "run")), callbacks=[Snapshot()]).train()
    params = {n: torch.nn.Parameter(t.clone()) for n, t in seen["params"].items()}
    for n, p in params.items():
        p.grad = seen["grads"][n]
    matrices = [p for n, p in params.items() if is_hidden_matrix(n, p)]
    rest = [p for n, p in params.items() if not is_hidden_matrix(n, p)]
    Muon(matrices, lr=lr, weight_decay=wd, momentum=0.95).step()
    torch.optim.AdamW([{"params": [p for p in rest if p.ndim >= 2], "weight_decay": wd},
                       {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
                      lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True).step()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name].detach()), name


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon: torch >= 2.9")
def test_our_muon_in_bf16_is_torch_s_muon():
    """The reference implementation (torch's, which iterates in bf16 always): the same steps."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(48, 24, generator=g)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    mine = Muon([ours], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(48, 24, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        ref.step()
    assert torch.equal(ours, theirs)


def test_newton_schulz_brings_every_singular_value_near_one():
    """On a full-rank matrix, in fp32 (what a CPU without bf16 units uses): 5 quintic steps
    put the singular values in about [0.7, 1.2] (Jordan, 2024), whatever they were."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    spread = torch.logspace(-1, 1, 32, dtype=torch.float64)  # singular values from 0.1 to 10
    matrix = (u[:, :32] * spread) @ v.T
    singular = torch.linalg.svdvals(orthogonalize(matrix.float(), torch.float32).double())
    assert singular.min() > 0.6 and singular.max() < 1.3, singular


def test_a_stack_is_orthogonalised_matrix_by_matrix():
    """Muon runs same-shape matrices through Newton-Schulz as one stack: each result is the
    matrix's own (within fp32 rounding of the batched products), tall and wide alike."""
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 40, 24), (3, 24, 40)):
        stack = torch.randn(*shape, generator=g) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
        together = orthogonalize(stack, torch.float32)
        for i in range(3):
            alone = orthogonalize(stack[i], torch.float32)
            # 15 products of sums over <= 40 terms of values <= ~1.2: a few hundred ulps at most.
            assert torch.allclose(together[i], alone, rtol=0, atol=2000 * torch.finfo(torch.float32).eps)


def test_muon_steps_same_shape_matrices_together_as_it_would_one_by_one():
    g = torch.Generator().manual_seed(1)
    starts = [torch.randn(32, 16, generator=g) for _ in range(3)] + [torch.randn(16, 16, generator=g)]
    grads = [torch.randn_like(s) for s in starts]
    together = [torch.nn.Parameter(s.clone()) for s in starts]
    alone = [torch.nn.Parameter(s.clone()) for s in starts]
    opt = Muon(together, lr=0.02)
    singles = [Muon([p], lr=0.02) for p in alone]
    for _ in range(2):
        for p, q, grad in zip(together, alone, grads, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        for single in singles:
            single.step()
    for p, q in zip(together, alone, strict=True):
        # An update moves a weight by lr * 0.2 * sqrt(32) * O(1): its rounding is ~1e-6 of that.
        assert torch.allclose(p, q, rtol=0, atol=1e-5)
    assert len(opt.state) == 4  # every matrix keeps its own momentum


def test_a_muon_run_resumes_bit_identically(seq_file, tmp_path):
    reference = Trainer(resume_config(seq_file, tmp_path / "a", optimizer="muon")).train()
    Trainer(resume_config(seq_file, tmp_path / "b", optimizer="muon", max_steps=3)).train()
    latest = find_latest_checkpoint(tmp_path / "b")
    state = Checkpoint.load(latest).states["optimizer"]
    assert set(state) == {"muon", "adamw"}  # each part's own state, by name
    resumed = Trainer(resume_config(seq_file, tmp_path / "b", optimizer="muon",
                                    model=DropoutLM(seed=9))).train(latest)
    for name, tensor in reference.raw_model.state_dict().items():
        assert torch.equal(resumed.raw_model.state_dict()[name], tensor), name


def test_muon_errors_name_the_fix():
    with pytest.raises(ValueError, match="muon orthogonalises whole matrices.*--parallel ddp"):
        TrainConfig(optimizer="muon", parallel="fsdp")
    with pytest.raises(ValueError, match="Muon takes 2-D weights only.*give it to AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def _rates(scheduler: WSDScheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_wsd_warms_up_holds_the_peak_and_decays_to_the_floor_at_the_end():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rates = _rates(WSDScheduler(optimizer, warmup_steps=2, total_steps=10, min_rate=0.1), 10)
    assert rates[:2] == pytest.approx([1 / 3, 2 / 3])
    assert rates[2:8] == [1.0] * 6  # stable: 80% of the run minus warm-up
    assert rates[8] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))  # 1 - sqrt decay
    assert rates[9] == pytest.approx(0.1)  # the last update uses the floor


def test_wsd_through_the_trainer_defaults_to_a_decay_over_the_last_fifth(make_config, seq_dataset):
    context = Trainer(make_config(model=micro_model(), dataset=seq_dataset, scheduler="wsd",
                                  max_steps=10, learning_rate=1e-3, min_rate=0.0)).train()
    assert context.scheduler.lr_decay_steps == 2 and context.scheduler.total_steps == 10
