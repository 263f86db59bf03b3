"""LoRA training with every strategy: only the adapter trains, DPO's and GRPO's reference is the
base with the adapter off (no copy), LoRA checkpoints are PEFT adapters that resume exactly,
and `astrai train --lora-rank` end to end, merged with `astrai model merge-lora`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import micro_model, resume_config
from typer.testing import CliRunner

from astrai_core import AutoModel, Checkpoint
from astrai_core.cli.main import app
from astrai_core.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from astrai_core.model.lora import LoRALinear, adapters_disabled, is_lora_parameter, lora_layers
from astrai_data import DatasetFactory
from astrai_train import DPOStrategy, TrainCallback, Trainer, find_latest_checkpoint
from astrai_train.strategies import AdaptersOff
from tolerances import forward_bound

STRATEGIES = ["seq", "sft", "dpo", "grpo"]


def _dataset(kind, request):
    return DatasetFactory.load(kind, request.getfixturevalue(f"{kind}_file"), window_size=16)


def _base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not is_lora_parameter(n)}


@pytest.mark.parametrize("kind", STRATEGIES)
def test_every_strategy_trains_the_adapter_and_leaves_the_base_untouched(kind, make_config,
                                                                         request):
    model = micro_model(0)
    base = _base_state(model)
    config = make_config(model=model, dataset=_dataset(kind, request), strategy=kind, max_steps=3,
                         learning_rate=1e-2, lora_rank=4, lora_targets="q_proj,v_proj,down_proj")
    context = Trainer(config).train()
    assert context.iteration == 3 and math.isfinite(context.loss)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(is_lora_parameter(n) for n in trained)
    assert len(lora_layers(model)) == 2 * 3
    # The optimizer holds the adapter only: r * (in + out) per layer (32->32, 32->16, 64->32).
    held = sum(p.numel() for g in context.optimizer.param_groups for p in g["params"])
    assert held == 2 * 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    for name, value in base.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model).values())


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_the_reference_is_the_base_with_the_adapter_off_not_a_copy(kind, make_config, request):
    model = micro_model(0)
    config = make_config(model=model, dataset=_dataset(kind, request), strategy=kind, max_steps=3,
                         learning_rate=1e-2, lora_rank=4)
    context = Trainer(config).train()
    ref = context.strategy.ref_model
    assert isinstance(ref, AdaptersOff)
    # Its parameters are the policy's own base tensors: no second copy of the weights.
    policy_base = {p.data_ptr() for n, p in model.named_parameters() if not is_lora_parameter(n)}
    assert {p.data_ptr() for p in ref.parameters()} == policy_base
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = micro_model(0)(ids)  # the starting weights, untouched by training
        got, adapted = ref(ids), model(ids)
    assert torch.equal(got, expected)
    assert (adapted - expected).abs().max() > 1e-4  # the adapter did train
    assert model.training and all(layer.lora_enabled for layer in lora_layers(model).values())


def test_a_lora_dpo_run_starts_at_ln2(dpo_file):
    """The adapter starts at zero, so policy == reference and every pair's loss is ln 2."""
    model = micro_model(0).double()
    from astrai_core.model.lora import LoRAConfig, apply_lora

    apply_lora(model, LoRAConfig(rank=4))
    strategy = DPOStrategy(model, beta=0.5)
    dataset = DatasetFactory.load("dpo", dpo_file)
    loss = strategy.compute_loss(dataset.collate_fn([dataset[i] for i in range(4)]))
    assert loss.detach().item() == pytest.approx(math.log(2), abs=4 * torch.finfo(torch.float64).eps)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not is_lora_parameter(n))


class Crash(TrainCallback):
    def on_step_end(self, ctx):
        if ctx.iteration == 5:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_a_lora_run_resumes_bit_identically_from_an_adapter_checkpoint(seq_file, tmp_path):
    lora = dict(lora_rank=4, lora_dropout=0.1)  # adapter dropout draws from the torch RNG

    def run(out, model_seed=0, callbacks=(), checkpoint=None):
        config = resume_config(seq_file, tmp_path / out, model=micro_model(model_seed), **lora)
        return Trainer(config, callbacks=list(callbacks)).train(checkpoint)

    reference = run("a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("b", callbacks=[Crash()])
    latest = find_latest_checkpoint(tmp_path / "b")
    assert latest.name == "step_00000003"
    files = {p.name for p in latest.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "trainer_state.json"} <= files
    assert "model.safetensors" not in files and "config.json" not in files  # the adapter alone
    resumed = run("b", checkpoint=latest)
    assert resumed.iteration == 8 and resumed.loss == reference.loss
    a, b = reference.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = Checkpoint.load(tmp_path / "a" / "step_00000008").adapter.state
    assert saved.keys() == {k for k in a if is_lora_parameter(k)}
    assert all(torch.equal(saved[k], a[k]) for k in saved)


def test_a_lora_resume_refuses_another_base_rank_or_a_full_checkpoint(seq_file, tmp_path):
    Trainer(resume_config(seq_file, tmp_path / "a", model=micro_model(0), lora_rank=4,
                          max_steps=3)).train()
    ckpt = Checkpoint.load(tmp_path / "a" / "step_00000003")
    with pytest.raises(ValueError, match="base model differs from the one this LoRA run"):
        Trainer(resume_config(seq_file, tmp_path / "a", model=micro_model(1),
                              lora_rank=4)).train(ckpt)
    with pytest.raises(ValueError, match=r"adapter \(rank 4, alpha 8.* differs from this run's "
                                         r"\(rank 2"):
        Trainer(resume_config(seq_file, tmp_path / "a", model=micro_model(0),
                              lora_rank=2)).train(ckpt)
    with pytest.raises(ValueError, match="holds a LoRA adapter but this run trains the whole"):
        Trainer(resume_config(seq_file, tmp_path / "a", model=micro_model(0))).train(ckpt)
    Trainer(resume_config(seq_file, tmp_path / "full", model=micro_model(0), max_steps=3)).train()
    full = Checkpoint.load(tmp_path / "full" / "step_00000003")
    with pytest.raises(ValueError, match="trains LoRA adapters but the checkpoint holds full"):
        Trainer(resume_config(seq_file, tmp_path / "full", model=micro_model(0),
                              lora_rank=4)).train(full)


@pytest.mark.slow
def test_online_grpo_samples_the_adapted_policy_and_trains_only_the_adapter(make_config):
    from test_online_grpo import greedy, prompts, source

    torch.set_num_threads(1)
    model = micro_model(0)
    base = _base_state(model)
    items = prompts(4, seed=5)
    with source(group_size=4) as rollouts:
        config = make_config(strategy="grpo", model=model, dataset=items, batch_size=2,
                             learning_rate=5e-2, max_steps=4, n_epoch=10, lora_rank=4)
        Trainer(config, strategy_kwargs={"rollout_source": rollouts}).train()
    for name, value in base.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    model.eval()
    with source(temperature=1e-4) as near_greedy:  # the engine runs the adapted layers
        near_greedy(items, model)
        for i, s in enumerate(near_greedy.last_rollouts):
            assert s.response_ids == greedy(model, items[i // 4]["prompt_ids"].tolist(), 6)
        with adapters_disabled(model):
            assert any(greedy(model, it["prompt_ids"].tolist(), 6)
                       != near_greedy.last_rollouts[4 * j].response_ids
                       for j, it in enumerate(items))


@pytest.mark.slow
def test_astrai_train_lora_sft_end_to_end_and_merge_lora(sft_file, tokenizer_dir, tmp_path):
    runner = CliRunner()
    base = tmp_path / "base"
    assert runner.invoke(app, ["model", "init", "--preset", "tiny", "--out", str(base),
                               "--vocab-size", "64", "--tokenizer", str(tokenizer_dir)]).exit_code == 0
    out = tmp_path / "run"
    args = ["train", "--strategy", "sft", "--data", str(sft_file), "--out", str(out), "--model",
            str(base), "--lora-rank", "4", "--lora-alpha", "16", "--lora-targets", "q_proj,v_proj",
            "--batch-size", "2", "--max-seq-len", "16", "--max-steps", "3", "--learning-rate",
            "1e-2", "--no-progress", "--device", "cpu"]
    result = runner.invoke(app, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "rank 4, alpha 16 on q_proj,v_proj" in result.output and "done: 3 steps" in result.output
    ckpt = out / "step_00000003"
    peft_config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    assert (peft_config["r"], peft_config["lora_alpha"]) == (4, 16.0)
    assert sorted(peft_config["target_modules"]) == ["q_proj", "v_proj"]
    merged_dir = tmp_path / "merged"
    merged = runner.invoke(app, ["model", "merge-lora", str(base), str(ckpt), "--out", str(merged_dir)])
    assert merged.exit_code == 0, merged.output
    adapted = load_adapter(AutoModel.from_pretrained(base), ckpt).eval()
    plain = AutoModel.from_pretrained(merged_dir).eval()
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    ids = torch.randint(5, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted(ids), plain(ids)
        before = AutoModel.from_pretrained(base)(ids)
    cfg = plain.config
    bound = forward_bound(cfg.n_layers, max(cfg.dim, cfg.dim_ffn), float(want.abs().max()),
                          dtype=torch.float32)
    assert (got - want).abs().max() <= bound
    assert (want - before).abs().max() > 10 * bound  # three steps moved the adapter
