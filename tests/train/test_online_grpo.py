"""Online GRPO: rollouts from the live policy through astrai-serve, reward loading, the missing
`rl` extra, a policy that measurably learns from its own samples, and `astrai train --online`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from train_helpers import VOCAB, micro_model
from typer.testing import CliRunner

from astrai_core import Checkpoint
from astrai_core.cli.main import app
from astrai_data import DatasetFactory, save_h5
from astrai_train import TrainCallback, Trainer, find_latest_checkpoint
from astrai_train.rl import EngineRolloutSource, RolloutConfig, build_reward, load_reward
from astrai_train.strategies.grpo import GRPOStrategy, group_advantages
from astrai_train.strategies.logprobs import token_log_probs
from tolerances import forward_bound, reorder_bound

STOP, PAD = 1, 0


class IdTokenizer:
    """Token i <-> the word w{i}; token 1 ends a response."""

    eos_id, stop_ids, pad_id = STOP, [STOP], PAD

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in (PAD, STOP)))


def low_words(prompt: str, response: str, **record: Any) -> float:
    """The fraction of response words among the low half of the vocabulary (w2..w31)."""
    words = response.split()
    return sum(int(w[1:]) < VOCAB // 2 for w in words) / max(len(words), 1)


def prompts(n: int, length: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"prompt_ids": torch.as_tensor(rng.integers(2, VOCAB, length)), "prompt": f"p{i}",
             "answer": "1", "lang": "en"} for i in range(n)]


def source(reward=low_words, **overrides: Any) -> EngineRolloutSource:
    config = RolloutConfig(**{"group_size": 4, "max_new_tokens": 6, "seed": 7, **overrides})
    return EngineRolloutSource(IdTokenizer(), reward, config)


# -- the rollout batch -------------------------------------------------------------------------

def test_rollout_batch_has_the_offline_layout_and_scores_each_response():
    torch.set_num_threads(1)
    model = micro_model(0)
    model.train()
    items = prompts(3)
    with source() as rollouts:
        torch.manual_seed(0)
        batch = rollouts(items, model)
        samples = rollouts.last_rollouts
    assert model.training  # restored after sampling in eval mode
    B, G, T = batch["input_ids"].shape
    assert (B, G) == (3, 4) and batch["rewards"].shape == (3, 4)
    assert batch["old_log_probs"].shape == (B, G, T)
    for i, s in enumerate(samples):
        b, g = divmod(i, G)
        row = s.prompt_ids + s.response_ids
        n, p = len(row) - 1, len(s.prompt_ids)
        assert s.prompt_ids == items[b]["prompt_ids"].tolist()
        assert 1 <= len(s.response_ids) <= 6
        assert STOP not in s.response_ids[:-1]  # sampling stops at the stop token ...
        # ... which, when sampled, is a label to learn (the model must learn to end)
        assert batch["input_ids"][b, g, :n].tolist() == row[:-1]
        assert batch["labels"][b, g, :n].tolist() == row[1:]  # labels[t] = input_ids[t + 1]
        assert (batch["input_ids"][b, g, n:] == PAD).all() and (batch["labels"][b, g, n:] == PAD).all()
        mask = batch["loss_mask"][b, g]
        assert mask.nonzero().flatten().tolist() == list(range(p - 1, n))  # response labels only
        assert batch["attention_mask"][b, g].sum() == n
        assert batch["rewards"][b, g] == pytest.approx(low_words("", s.text))
        assert s.text == IdTokenizer().decode(s.response_ids)


def test_a_response_that_stops_learns_its_stop_token():
    class ManyStops(IdTokenizer):
        stop_ids = tuple(range(1, 40))  # most tokens end the response

    torch.manual_seed(0)
    config = RolloutConfig(group_size=4, max_new_tokens=6, seed=7)
    with EngineRolloutSource(ManyStops(), low_words, config) as rollouts:
        batch = rollouts(prompts(2), micro_model(0))
        samples = rollouts.last_rollouts
    stopped = [(i, s) for i, s in enumerate(samples) if s.response_ids[-1] in ManyStops.stop_ids]
    assert stopped and any(len(s.response_ids) < 6 for _, s in stopped)
    for i, s in stopped:
        b, g = divmod(i, 4)
        last = len(s.prompt_ids) + len(s.response_ids) - 2  # the position predicting the stop
        assert batch["labels"][b, g, last] == s.response_ids[-1] and batch["loss_mask"][b, g, last]
        assert not batch["loss_mask"][b, g, last + 1:].any()
        assert all(t not in ManyStops.stop_ids for t in s.response_ids[:-1])


def test_an_online_batch_equals_the_offline_batch_of_the_same_responses(tmp_path):
    """The offline GRPODataset + collate, fed the sampled sequences with their response masks,
    give the very same tensors: offline and online batches mean the same thing."""
    with source() as rollouts:
        torch.manual_seed(1)
        online = rollouts(prompts(3, seed=3), micro_model(3))
        samples = rollouts.last_rollouts
    seqs = [np.array(s.prompt_ids + s.response_ids) for s in samples]
    masks = [np.r_[np.zeros(len(s.prompt_ids), bool), np.ones(len(s.response_ids), bool)]
             for s in samples]
    path = save_h5(tmp_path / "offline.h5", "grpo", {"sequence": seqs, "loss_mask": masks},
                   records={"lengths": np.array([len(q) for q in seqs]).reshape(3, 4),
                            "rewards": online["rewards"].numpy()},
                   info={"grpo_mode": "offline", "pad_id": PAD})
    dataset = DatasetFactory.load("grpo", path)
    offline = dataset.collate_fn([dataset[i] for i in range(3)])
    assert set(online) == {*offline, "old_log_probs"}
    for key, value in offline.items():
        assert torch.equal(online[key], value), key


def test_old_log_probs_are_a_fresh_forward_so_the_first_ratio_is_one():
    model = micro_model(1)
    items = prompts(2, seed=1)
    with source() as rollouts:
        batch = rollouts(items, model)
    B, G, T = batch["input_ids"].shape
    model.eval()  # the rollout's forward ran in eval mode
    with torch.no_grad():
        fresh = token_log_probs(model, batch["input_ids"].view(-1, T),
                                batch["labels"].view(-1, T)).view(B, G, T)
    mask = batch["loss_mask"]
    # Both are fp32 forwards of the micro model (2 blocks, width <= 64), maybe in other batch
    # layouts: the worst-case rounding bound of tests/tolerances.py.
    logp_error = forward_bound(2, 64, scale=float(fresh[mask].abs().max()), dtype=torch.float32)
    assert (batch["old_log_probs"][mask] - fresh[mask]).abs().max() <= logp_error
    # Through the strategy: ratio 1 everywhere, so nothing is clipped and (no KL) the loss is
    # the token-weighted mean of -A: -sum_i A_i n_i / sum_i n_i over responses of n_i tokens.
    strategy = GRPOStrategy(model, kl_coef=0.0, rollout_source=lambda p, m: batch)
    loss = strategy.compute_loss(strategy.prepare_batch(items)).detach()
    assert float(strategy.metrics["clip_fraction"]) == 0.0
    adv = group_advantages(batch["rewards"])
    n = mask.sum(-1).float()
    # ratio = exp(logp - old) is 1 up to logp_error; then a masked mean of |A| <= max|A|.
    top = float(adv.abs().max())
    tol = top * 2 * logp_error + reorder_bound(int(n.sum()), scale=top, dtype=torch.float32)
    assert float(loss) == pytest.approx(float(-(adv * n).sum() / n.sum()), abs=tol)


def test_online_without_old_log_probs_the_ratio_is_the_policy_itself():
    """The trainer's rollouts carry no sampling log-probs: the ratio's denominator is the
    policy detached, so rho is exactly 1 and the loss's gradient is the policy gradient,
    sum_i A_i grad log pi(y_i) / tokens (no KL), whatever the reference says."""
    model = micro_model(1)
    items = prompts(2, seed=1)
    with source(old_log_probs=False) as rollouts:
        batch = rollouts(items, model)
    assert "old_log_probs" not in batch
    strategy = GRPOStrategy(model, kl_coef=0.0, rollout_source=lambda p, m: batch,
                            ref_model=micro_model(5))  # a reference far from the policy
    loss = strategy.compute_loss(strategy.prepare_batch(items))
    mask = batch["loss_mask"]
    adv = group_advantages(batch["rewards"])
    n = mask.sum(-1).float()
    assert float(strategy.metrics["clip_fraction"]) == 0.0
    top = float(adv.abs().max())
    assert float(loss.detach()) == pytest.approx(
        float(-(adv * n).sum() / n.sum()), abs=reorder_bound(int(n.sum()), scale=top, dtype=torch.float32))
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    T = batch["input_ids"].shape[-1]
    logp = token_log_probs(model, batch["input_ids"].view(-1, T), batch["labels"].view(-1, T))
    weights = (adv.view(-1, 1) * mask.view(-1, T)).to(logp) / n.sum()
    (-(logp * weights).sum()).backward()
    for a, p in zip(got, model.parameters(), strict=True):
        # The same backward products; only the loss's sum and the min's tie split (half the
        # gradient through each side) round differently: ~100 fp32 ulps bounds it.
        eps = torch.finfo(torch.float32).eps
        assert torch.allclose(a, p.grad, rtol=100 * eps, atol=100 * eps * float(p.grad.abs().max()))


def test_a_seeded_rollout_is_reproducible_and_later_rollouts_differ():
    def run() -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(3)
        model = micro_model(2)
        with source() as rollouts:
            return [rollouts(prompts(2), model) for _ in range(2)]

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])  # fresh seeds per call


def greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """Plain full-forward greedy decoding, stopping after the stop token."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(token)
            if token == STOP:
                break
    return out


def test_the_engine_is_made_once_and_always_samples_the_current_weights():
    torch.manual_seed(0)
    model = micro_model(4)
    items = prompts(2, seed=4)
    with source(temperature=1e-4) as rollouts:  # near-greedy
        rollouts(items, model)
        engine = rollouts._engine
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        model.train()
        rollouts(items, model)
        assert rollouts._engine is engine  # reused, not rebuilt
        model.eval()
        for i, s in enumerate(rollouts.last_rollouts):
            assert s.response_ids == greedy(model, items[i // 4]["prompt_ids"].tolist(), 6)
    assert rollouts._engine is None  # closed on exit


# -- learning from its own samples -----------------------------------------------------------

def mean_reward(model: torch.nn.Module, items: list[dict[str, Any]]) -> float:
    """The policy's mean reward over 8 samples per prompt, with fixed sampling seeds."""
    torch.manual_seed(123)
    with source(group_size=8, seed=99) as rollouts:
        return float(rollouts(items, model)["rewards"].mean())


def test_online_grpo_raises_the_mean_reward_of_a_tiny_policy(make_config):
    torch.set_num_threads(1)
    model, items = micro_model(0), prompts(8, seed=5)
    before = mean_reward(model, items)
    with source(group_size=8) as rollouts:
        config = make_config(strategy="grpo", model=model, dataset=items, batch_size=4,
                             learning_rate=1e-2, max_steps=20, n_epoch=100)
        context = Trainer(config, strategy_kwargs={"rollout_source": rollouts}).train()
    after = mean_reward(model, items)
    assert context.iteration == 20 and rollouts.calls == 20
    # Observed 0.50 -> 0.98 (chance is 0.5: half the vocabulary scores).
    assert 0.4 < before < 0.6 and after > before + 0.3, (before, after)


class Crash(TrainCallback):
    def on_step_end(self, ctx):
        if ctx.iteration == 4:
            raise RuntimeError("simulated crash")


def test_an_online_run_resumes_bit_identically(make_config, tmp_path):
    def run(out: str, callbacks=(), checkpoint=None):
        config = make_config(strategy="grpo", model=micro_model(0), dataset=prompts(8, seed=2),
                             batch_size=2, learning_rate=1e-2, max_steps=6, n_epoch=10,
                             ckpt_interval=3, out=str(tmp_path / out), seed=11)
        with source() as rollouts:
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


# -- reward functions --------------------------------------------------------------------------

def test_builtin_rewards_score_the_synthetic_tasks():
    item = {"answer": "7", "lang": "en", "messages": []}
    exact, fmt = load_reward("exact_answer"), load_reward("format")
    assert exact("3 + 4 = ?", "3 + 4 = 7.", **item) == 1.0
    assert exact("3 + 4 = ?", "3 + 4 = 8.", **item) == 0.0
    assert fmt("3 + 4 = ?", "3 + 4 = 8.", **item) == 1.0
    assert fmt("3 + 4 = ?", "seven", **item) == 0.0
    both = build_reward("exact_answer, format")
    assert both("3 + 4 = ?", "3 + 4 = 8.", **item) == 0.5  # the mean of the two
    assert build_reward([low_words, "format"])("p", "w2 w40", **item) == 0.25


def test_load_reward_imports_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompt, response, **record):\n    return 1.0 / (1 + len(response))\n"
        "LIMIT = 3\n")
    (tmp_path / "broken_rewards.py").write_text("def f(:\n")
    (tmp_path / "needy_rewards.py").write_text("import not_a_real_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:short")("p", "abc") == 0.25
    errors = {"my_rewards": "expected a built-in (exact_answer, format) or module:function",
              "my_rewards:": "expected a built-in",
              "nowhere_rewards:f": "no module named 'nowhere_rewards'; run from the folder",
              "my_rewards:long": "has no attribute 'long'; it defines: short",
              "my_rewards:LIMIT": "'LIMIT' is a int, not a function",
              "broken_rewards:f": "broken_rewards.py, line 1",
              "needy_rewards:f": "it needs 'not_a_real_dependency': install that package"}
    for spec, message in errors.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            load_reward(spec)
    with pytest.raises(ValueError, match="needs a reward"):
        build_reward([])


def test_prompts_need_online_and_online_needs_prompts(make_config, grpo_file, tokenizer_dir):
    model = micro_model(0)
    config = make_config(strategy="grpo", model=model, dataset=prompts(4), max_steps=1)
    with pytest.raises(ValueError, match="holds prompts only: train it online"):
        Trainer(config).train()
    offline = DatasetFactory.load("grpo", grpo_file)
    config = make_config(strategy="grpo", model=model, dataset=offline, online=True,
                         tokenizer=str(tokenizer_dir))
    with pytest.raises(ValueError, match="this file holds scored groups"):
        Trainer(config).train()


# -- the optional extra -----------------------------------------------------------------------

def test_without_astrai_serve_online_grpo_says_how_to_install_it(monkeypatch, make_config,
                                                                 tokenizer_dir):
    monkeypatch.setitem(sys.modules, "astrai_serve", None)  # `import astrai_serve` now fails
    hint = "online GRPO needs astrai-serve: pip install 'astrai-train[rl]'"
    with pytest.raises(ImportError, match=re.escape(hint)) as info:
        EngineRolloutSource(IdTokenizer(), low_words)
    assert "uv sync --extra rl" in str(info.value)
    config = make_config(strategy="grpo", model=micro_model(0), dataset=prompts(4),
                         online=True, tokenizer=str(tokenizer_dir))
    with pytest.raises(ImportError, match=re.escape(hint)):
        Trainer(config).train()


# -- the command line ----------------------------------------------------------------------------

@pytest.fixture
def online_grpo_file(tmp_path: Path) -> Path:
    """Four synthetic-style prompts (token ids of the conftest tokenizer) with answers."""
    rng = np.random.default_rng(6)
    ids = [rng.integers(5, VOCAB, 6) for _ in range(4)]
    texts = [f"{a} + {b} = ?" for a, b in ((1, 2), (3, 4), (5, 1), (2, 2))]
    return save_h5(tmp_path / "online.h5", "grpo", {"prompt": ids},
                   records={"prompt_lengths": np.array([len(i) for i in ids])},
                   texts={"prompt": texts, "answer": ["3", "7", "6", "4"], "lang": ["en"] * 4,
                          "messages": [json.dumps([{"role": "user", "content": t}]) for t in texts]},
                   info={"grpo_mode": "online"})


def test_astrai_train_online_grpo_runs_end_to_end(online_grpo_file, tokenizer_dir, tmp_path):
    dataset = DatasetFactory.load("grpo", online_grpo_file)
    assert dataset.online and dataset[1]["answer"] == "7"
    out = tmp_path / "run"
    args = ["train", "--strategy", "grpo", "--online", "--reward", "exact_answer,format",
            "--data", str(online_grpo_file), "--out", str(out), "--preset", "tiny",
            "--tokenizer", str(tokenizer_dir), "--batch-size", "2", "--grpo-group-size", "3",
            "--rollout-max-tokens", "4", "--max-steps", "2", "--ckpt-interval", "2",
            "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "done: 2 steps" in result.output
    # 2 prompts x 3 responses x (6 prompt + at most 4 new tokens)
    assert re.search(r"tokens per optimizer step\W+60\b", result.output)
    saved = Checkpoint.load(out / "step_00000002").states["trainer"]["config"]
    assert saved["online"] is True and saved["reward"] == "exact_answer,format"
    assert saved["rollout_max_tokens"] == 4  # rollout options resume with the run
