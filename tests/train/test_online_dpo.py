"""Online DPO: responses sampled from the live policy through astrai-serve, ranked by a reward,
and trained on as each prompt's best/worst pair against the frozen reference; a tiny policy's
mean reward rises, a run resumes exactly, and `astrai train --strategy dpo --online`."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_online_grpo import mean_reward, online_grpo_file, prompts, source
from train_helpers import MICRO_GRAD_TERMS, micro_model
from typer.testing import CliRunner

from astrai_core import Checkpoint
from astrai_core.cli.main import app
from astrai_train import DPOStrategy, TrainCallback, Trainer, find_latest_checkpoint
from astrai_train.strategies import preference_pairs
from tolerances import reorder_bound

__all__ = ["online_grpo_file"]  # the fixture, shared with the online GRPO tests


def test_each_prompt_pairs_its_best_and_worst_response_and_ties_weigh_nothing():
    B, G, T = 3, 4, 5
    ids = torch.arange(B * G * T).view(B, G, T)
    groups = {"input_ids": ids, "labels": ids + 1000, "loss_mask": ids % 2 == 0,
              "attention_mask": torch.ones(B, G, T, dtype=torch.bool),
              "rewards": torch.tensor([[0.1, 0.9, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0],
                                       [0.2, 0.2, 0.7, 0.7]])}
    pairs = preference_pairs(groups)
    assert pairs["chosen_input_ids"].tolist() == [ids[0, 1].tolist(), ids[1, 0].tolist(),
                                                  ids[2, 2].tolist()]
    assert pairs["rejected_input_ids"].tolist() == [ids[0, 3].tolist(), ids[1, 0].tolist(),
                                                    ids[2, 0].tolist()]
    assert torch.equal(pairs["chosen_labels"][0], ids[0, 1] + 1000)
    assert torch.equal(pairs["rejected_loss_mask"][2], ids[2, 0] % 2 == 0)
    assert pairs["pair_weights"].tolist() == [1.0, 0.0, 1.0]  # all four equal: no preference


def test_the_loss_of_a_weighted_batch_is_the_mean_over_the_pairs_that_count(dpo_file):
    from astrai_data import DatasetFactory

    dataset = DatasetFactory.load("dpo", dpo_file)
    batch = dataset.collate_fn([dataset[i] for i in range(3)])
    model = micro_model(0).double()
    strategy = DPOStrategy(model, beta=0.5)
    with torch.no_grad():
        for p in model.parameters():  # away from the reference, so pairs' losses differ
            p.add_(torch.randn_like(p) * 0.05)
    weighted = {**batch, "pair_weights": torch.tensor([1.0, 0.0, 1.0]),
                "sampled_rewards": torch.zeros(3, 2)}
    loss = strategy.compute_loss(weighted).item()
    kept = {k: v[[0, 2]] for k, v in batch.items()}
    expected = strategy.compute_loss(kept).item()
    # float64; the batches of 3 and 2 rows may block their matmuls differently.
    assert loss == pytest.approx(expected, abs=reorder_bound(MICRO_GRAD_TERMS))
    assert strategy.loss_weight(weighted) == 2.0


@pytest.mark.slow
def test_online_dpo_raises_the_mean_reward_of_a_tiny_policy(make_config):
    torch.set_num_threads(1)
    model, items = micro_model(0), prompts(8, seed=5)
    before = mean_reward(model, items)
    with source(group_size=4, old_log_probs=False) as rollouts:
        config = make_config(strategy="dpo", online=True, model=model, dataset=items,
                             batch_size=4, learning_rate=1e-2, dpo_beta=0.1, max_steps=20,
                             n_epoch=100)
        context = Trainer(config, strategy_kwargs={"rollout_source": rollouts}).train()
    after = mean_reward(model, items)
    assert context.iteration == 20 and rollouts.calls == 20
    assert math.isfinite(context.loss)
    # Chance is 0.5 (half the vocabulary scores); observed 0.50 -> 0.78.
    assert 0.4 < before < 0.6 and after > before + 0.2, (before, after)


def test_the_trainer_s_rollouts_skip_the_sampling_log_probs(make_config, tokenizer_dir):
    from astrai_train.builder import build_rollout_source

    dpo = build_rollout_source(make_config(strategy="dpo", online=True,
                                           tokenizer=str(tokenizer_dir)))
    grpo = build_rollout_source(make_config(strategy="grpo", online=True,
                                            tokenizer=str(tokenizer_dir)))
    # One update per rollout: the sampling policy is the trained one (GRPO detaches it).
    assert dpo.config.old_log_probs is False and grpo.config.old_log_probs is False
    for rollouts in (dpo, grpo):
        with rollouts:
            assert "old_log_probs" not in rollouts(prompts(1), micro_model(0))


class Crash(TrainCallback):
    def on_step_end(self, ctx):
        if ctx.iteration == 4:
            raise RuntimeError("simulated crash")


def test_an_online_dpo_run_with_lora_resumes_bit_identically(make_config, tmp_path):
    def run(out: str, callbacks=(), checkpoint=None):
        config = make_config(strategy="dpo", online=True, model=micro_model(0),
                             dataset=prompts(8, seed=2), batch_size=2, learning_rate=1e-2,
                             max_steps=6, n_epoch=10, ckpt_interval=3, out=str(tmp_path / out),
                             seed=11, lora_rank=4)
        with source(old_log_probs=False) as rollouts:
            trainer = Trainer(config, callbacks=list(callbacks),
                              strategy_kwargs={"rollout_source": rollouts})
            return trainer.train(checkpoint)

    reference = run("a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("b", [Crash()])
    resumed = run("b", checkpoint=find_latest_checkpoint(tmp_path / "b"))
    assert resumed.iteration == 6 and resumed.loss == reference.loss
    a, b = reference.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same responses were sampled
    assert Checkpoint.load(tmp_path / "b" / "step_00000006").adapter is not None


@pytest.mark.slow
def test_astrai_train_online_dpo_runs_end_to_end(online_grpo_file, dpo_file, tokenizer_dir,
                                                 tmp_path):
    out = tmp_path / "run"
    args = ["train", "--strategy", "dpo", "--online", "--reward", "exact_answer,format",
            "--data", str(online_grpo_file), "--out", str(out), "--preset", "tiny",
            "--tokenizer", str(tokenizer_dir), "--batch-size", "2", "--grpo-group-size", "3",
            "--rollout-max-tokens", "4", "--max-steps", "2", "--ckpt-interval", "2",
            "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "done: 2 steps" in result.output
    # 2 prompts x the best and worst response x (6 prompt + at most 4 new tokens)
    assert re.search(r"tokens per optimizer step\W+40\b", result.output)
    saved = Checkpoint.load(out / "step_00000002").states["trainer"]["config"]
    assert saved["online"] is True and saved["strategy"] == "dpo"
    pairs = CliRunner().invoke(app, [*args[:7], str(dpo_file), "--out", str(tmp_path / "p"),
                                     *args[10:]])
    assert "--online dpo samples responses to prompts, but" in str(pairs.exception)
    grpo_only = CliRunner().invoke(app, ["train", "--strategy", "sft", "--online", "--data",
                                         str(dpo_file), "--out", str(tmp_path / "s"), "--preset",
                                         "tiny", "--tokenizer", str(tokenizer_dir)])
    assert "is for the grpo and dpo strategies, not 'sft'" in str(grpo_only.exception)
