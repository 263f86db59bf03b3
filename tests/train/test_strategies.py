"""The four losses against independent computations of the seed's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import micro_model

from astrai_data import DatasetFactory
from astrai_train import (
    DPOStrategy,
    GRPOStrategy,
    SEQStrategy,
    SFTStrategy,
    StrategyFactory,
    Trainer,
)
from astrai_train.strategies import group_advantages
from tolerances import reorder_bound

V = 5  # vocabulary of the table model
# Losses here are compared with independent computations in float64 (models and tables are
# float64), so each tolerance is the reordering bound of the sums involved (train_helpers):
# it holds on any CPU and is far below what a wrong formula gives (> 1e-3).


class TableLM(nn.Module):
    """logits[t] = table[input_ids[t]]: a model whose log-probabilities are easy to write by hand."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed),
                                              dtype=torch.float64))

    def forward(self, input_ids: torch.Tensor, input_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[input_ids]


def _log_softmax(row: list[float], j: int) -> float:
    return row[j] - math.log(sum(math.exp(v) for v in row))


# -- SEQ / SFT --------------------------------------------------------------------------------
def _lm_batch(seed: int = 0, B: int = 3, T: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (B, T + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
            "loss_mask": torch.rand(B, T, generator=g) < 0.5}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_seq_loss_is_next_token_cross_entropy(smoothing):
    model, batch = micro_model().double(), _lm_batch()
    loss = SEQStrategy(model, label_smoothing=smoothing).compute_loss(batch)
    logits = model(batch["input_ids"])
    want = F.cross_entropy(logits.reshape(-1, 64), batch["labels"].reshape(-1), label_smoothing=smoothing)
    # 18 tokens, each a 64-way logsumexp of logits below 10.
    torch.testing.assert_close(loss, want, atol=reorder_bound(18 * 64, scale=10.0), rtol=0)


def test_sft_counts_only_the_masked_tokens():
    model, batch = micro_model().double(), _lm_batch()
    strategy = SFTStrategy(model)
    loss = strategy.compute_loss(batch)
    logp = torch.log_softmax(model(batch["input_ids"]), -1)
    picked = logp.gather(-1, batch["labels"][..., None])[..., 0]
    want = -picked[batch["loss_mask"]].mean()
    torch.testing.assert_close(loss, want, atol=reorder_bound(18 * 64, scale=10.0), rtol=0)
    other = dict(batch, labels=torch.where(batch["loss_mask"], batch["labels"], 0))
    assert torch.equal(strategy.compute_loss(other), loss)  # unmasked labels do not matter
    assert strategy.loss_weight(batch) == batch["loss_mask"].sum().item()


def test_sft_without_a_loss_mask_is_explained():
    batch = _lm_batch()
    del batch["loss_mask"]
    with pytest.raises(ValueError, match="need a 'loss_mask'.*--strategy sft"):
        SFTStrategy(micro_model()).compute_loss(batch)


# -- DPO --------------------------------------------------------------------------------------
def _pair_batch() -> dict[str, torch.Tensor]:
    ids = {"chosen": torch.tensor([[1, 2, 3, 4], [2, 2, 0, 0]]),
           "rejected": torch.tensor([[1, 2, 4, 0, 0], [2, 3, 1, 1, 4]])}
    labels = {"chosen": torch.tensor([[2, 3, 4, 1], [2, 1, 0, 0]]),
              "rejected": torch.tensor([[2, 4, 3, 0, 0], [3, 1, 1, 4, 0]])}
    masks = {"chosen": torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool),
             "rejected": torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)}
    return {f"{s}_{k}": d[s] for s in ("chosen", "rejected")
            for k, d in (("input_ids", ids), ("labels", labels), ("loss_mask", masks))}


def _hand_sequence_logp(table: torch.Tensor, ids, labels, mask) -> list[float]:
    rows = table.tolist()
    return [sum(_log_softmax(rows[x], y) for x, y, m in zip(i, lab, ms, strict=True) if m)
            for i, lab, ms in zip(ids.tolist(), labels.tolist(), mask.tolist(), strict=True)]


def test_dpo_loss_matches_the_seed_formula_by_hand():
    policy, ref, batch, beta = TableLM(0), TableLM(1), _pair_batch(), 0.3
    strategy = DPOStrategy(policy, ref_model=ref, beta=beta)
    loss = strategy.compute_loss(batch)
    side = {s: [_hand_sequence_logp(m.table.detach(), batch[f"{s}_input_ids"], batch[f"{s}_labels"],
                                    batch[f"{s}_loss_mask"]) for m in (policy, ref)]
            for s in ("chosen", "rejected")}
    losses = []
    for i in range(2):
        z = beta * (side["chosen"][0][i] - side["chosen"][1][i]) \
            - beta * (side["rejected"][0][i] - side["rejected"][1][i])
        losses.append(-math.log(1 / (1 + math.exp(-z))))
    tol = reorder_bound(4 * 2 * 5 * 4, scale=10.0)  # 4 sums of <= 4 tokens x 5-way logsumexps
    assert loss.item() == pytest.approx(sum(losses) / 2, abs=tol)
    margins = [-math.log(math.exp(v) - 1) for v in losses]  # invert -log(sigmoid(z))
    assert strategy.metrics["reward_margin"].item() == pytest.approx(sum(margins) / 2, abs=tol)
    summed = DPOStrategy(policy, ref_model=ref, beta=beta, reduction="sum").compute_loss(batch)
    assert summed.item() == pytest.approx(sum(losses), abs=tol)


def test_rpo_alpha_adds_the_chosen_replies_token_nll():
    policy, ref, batch, beta, alpha = TableLM(0), TableLM(1), _pair_batch(), 0.3, 0.7
    plain = DPOStrategy(policy, ref_model=ref, beta=beta).compute_loss(batch)
    mixed = DPOStrategy(policy, ref_model=ref, beta=beta, rpo_alpha=alpha).compute_loss(batch)
    chosen = _hand_sequence_logp(policy.table.detach(), batch["chosen_input_ids"],
                                 batch["chosen_labels"], batch["chosen_loss_mask"])
    tokens = batch["chosen_loss_mask"].sum(-1).tolist()
    nll = -sum(lp / n for lp, n in zip(chosen, tokens, strict=True)) / 2
    tol = reorder_bound(4 * 2 * 5 * 4, scale=10.0)
    assert mixed.item() == pytest.approx(plain.item() + alpha * nll, abs=tol)
    with pytest.raises(ValueError, match="rpo_alpha must be >= 0"):
        DPOStrategy(policy, ref_model=ref, rpo_alpha=-1.0)


def _equal_length_pairs(tmp_path, n: int = 16):
    """Random prompts and replies, chosen and rejected of the same length: which one the policy
    prefers then depends only on what DPO taught it, not on how long the replies are."""
    import numpy as np

    from astrai_data import save_h5

    rng = np.random.default_rng(5)
    sides = {}
    for side in ("chosen", "rejected"):
        seqs = [rng.integers(5, 64, 8) for _ in range(n)]
        sides[side] = seqs
        sides[f"{side}_mask"] = [np.r_[np.zeros(4, bool), np.ones(4, bool)]] * n
    for i in range(n):  # both sides share the prompt
        sides["rejected"][i][:4] = sides["chosen"][i][:4]
    records = {f"{side}_lengths": np.full(n, 8) for side in ("chosen", "rejected")}
    return save_h5(tmp_path / "pairs.h5", "dpo", sides, records=records)


def test_dpo_raises_preference_accuracy_from_a_coin_flip(make_config, tmp_path):
    """Preference accuracy: the policy's summed log-probability of the chosen reply above the
    rejected one (what the quickstart's table reports), on a fixed problem from fixed seeds."""
    from astrai_train.strategies.dpo import stack_pairs
    from astrai_train.strategies.logprobs import sequence_log_probs

    dataset = DatasetFactory.load("dpo", _equal_length_pairs(tmp_path))
    batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])

    @torch.no_grad()
    def preference_accuracy(model: nn.Module) -> float:
        chosen, rejected = sequence_log_probs(model, *stack_pairs(batch)).chunk(2)
        return float((chosen > rejected).float().mean())

    model = micro_model(0)
    start = preference_accuracy(model)
    Trainer(make_config(model=model, dataset=dataset, strategy="dpo", batch_size=4, max_steps=30,
                        learning_rate=1e-2, dpo_beta=0.5)).train()
    assert start <= 0.625  # random weights: about a coin flip over 16 pairs
    assert preference_accuracy(model) >= 0.9375  # at most one of 16 pairs still wrong


def test_dpo_starts_at_ln2_and_the_reference_never_changes():
    policy = TableLM(0)
    strategy = DPOStrategy(policy, beta=0.5)
    ref = strategy.ref_model
    start = ref.table.detach().clone()
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = strategy.compute_loss(_pair_batch())
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[0] == pytest.approx(math.log(2), abs=4 * torch.finfo(torch.float64).eps)
    assert losses[-1] < losses[0]
    assert torch.equal(ref.table, start) and ref.table.grad is None
    assert not torch.equal(policy.table, start)
    assert strategy.metrics["reward_accuracy"].item() == 1.0


def test_dpo_rejects_bad_arguments_and_batches():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOStrategy(TableLM(0), beta=0)
    with pytest.raises(ValueError, match="reduction must be one of mean, sum"):
        DPOStrategy(TableLM(0), reduction="max")
    with pytest.raises(ValueError, match="need rejected_input_ids.*--strategy dpo"):
        DPOStrategy(TableLM(0)).compute_loss({k: v for k, v in _pair_batch().items()
                                             if not k.startswith("rejected")})


# -- GRPO -------------------------------------------------------------------------------------
def _group_batch(old: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    B, G, T = 2, 3, 4
    ids = torch.randint(0, V, (B, G, T + 1), generator=g)
    mask = torch.ones(B, G, T, dtype=torch.bool)
    mask[..., 0] = False  # the first label is prompt
    mask[0, 1, 3] = False  # a shorter response
    batch = {"input_ids": ids[..., :-1], "labels": ids[..., 1:], "loss_mask": mask,
             "attention_mask": torch.ones(B, G, T, dtype=torch.bool),
             "rewards": torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.9, 0.9]])}
    if old:
        batch["old_log_probs"] = -torch.rand(B, G, T, generator=g) * 3
    return batch


def _hand_grpo_loss(table, ref_table, batch, clip_eps, kl_coef, eps=1e-4, scale=True) -> float:
    """The seed's formula, written out token by token in plain Python floats."""
    policy_sum = kl_sum = 0.0
    count = 0
    for b, rewards in enumerate(batch["rewards"].tolist()):
        mu = sum(rewards) / len(rewards)
        sigma = math.sqrt(sum((r - mu) ** 2 for r in rewards) / len(rewards))  # population std
        for g, r in enumerate(rewards):
            adv = (r - mu) / (sigma + eps) if scale else r - mu
            for t in range(batch["input_ids"].shape[-1]):
                if not batch["loss_mask"][b, g, t]:
                    continue
                x, y = int(batch["input_ids"][b, g, t]), int(batch["labels"][b, g, t])
                logp, ref = _log_softmax(table[x], y), _log_softmax(ref_table[x], y)
                den = float(batch["old_log_probs"][b, g, t]) if "old_log_probs" in batch else ref
                ratio = math.exp(logp - den)
                clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
                policy_sum += min(ratio * adv, clipped * adv)
                kl_sum += (logp - ref) ** 2
                count += 1
    return -policy_sum / count + kl_coef * kl_sum / count


@pytest.mark.parametrize("old", [False, True], ids=["offline-ratio-to-ref", "ratio-to-old"])
def test_grpo_loss_and_gradients_match_the_seed_formula_by_hand(old):
    policy, ref, batch = TableLM(0), TableLM(1), _group_batch(old)
    clip_eps, kl_coef = 0.2, 0.3
    strategy = GRPOStrategy(policy, ref_model=ref, clip_eps=clip_eps, kl_coef=kl_coef, group_size=3)
    loss = strategy.compute_loss(batch)
    loss.backward()
    table, ref_table = policy.table.detach().double().tolist(), ref.table.detach().double().tolist()
    # 22 response tokens, each a ratio of two 5-way softmaxes.
    assert loss.item() == pytest.approx(_hand_grpo_loss(table, ref_table, batch, clip_eps, kl_coef),
                                        abs=reorder_bound(22 * 5 * 4, scale=10.0))
    assert 0 < strategy.metrics["clip_fraction"].item() < 1  # both branches are exercised
    # Gradient: central differences of the hand formula in float64.
    h, grad = 1e-6, torch.zeros(V, V, dtype=torch.float64)
    for i in range(V):
        for j in range(V):
            up = [row[:] for row in table]
            down = [row[:] for row in table]
            up[i][j] += h
            down[i][j] -= h
            grad[i, j] = (_hand_grpo_loss(up, ref_table, batch, clip_eps, kl_coef)
                          - _hand_grpo_loss(down, ref_table, batch, clip_eps, kl_coef)) / (2 * h)
    # Central differences err by ~h^2 |f'''| + eps |f| / h: about 1e-12 + 2e-10 here.
    torch.testing.assert_close(policy.table.grad, grad, atol=1e-8, rtol=0)


def test_grpo_advantages_use_the_population_std():
    rewards = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0]], dtype=torch.float64)
    adv = group_advantages(rewards, eps=1e-12)
    sigma = math.sqrt(1 / 6)
    # eps=1e-12 shifts each by ~|A| 1e-12 / sigma; the rest is float64 rounding of 3 terms.
    assert adv[0].tolist() == pytest.approx([0.5 / sigma, -0.5 / sigma, 0.0], abs=1e-11)
    assert adv[1].tolist() == [0.0, 0.0, 0.0]  # equal rewards: no signal, not NaN


def test_grpo_advantages_without_scaling_are_centred_rewards():
    """Dr. GRPO: r - mean, so a group that is right 7 times in 8 gives its one wrong reply -7/8,
    not the -2.6 that dividing by the std (0.33) gives."""
    rewards = torch.tensor([[1.0] * 7 + [0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]],
                           dtype=torch.float64)
    adv = group_advantages(rewards, scale=False)
    assert adv[0].tolist() == [0.125] * 7 + [-0.875]  # exact in binary floating point
    assert adv[1].tolist() == [0.0] * 8
    assert group_advantages(rewards)[0, -1].item() == pytest.approx(-7 ** 0.5, rel=1e-3)


def test_grpo_without_reward_scaling_matches_the_formula_by_hand():
    policy, ref, batch = TableLM(0), TableLM(1), _group_batch(True)
    strategy = GRPOStrategy(policy, ref_model=ref, clip_eps=0.2, kl_coef=0.3, scale_rewards=False)
    table, ref_table = policy.table.detach().tolist(), ref.table.detach().tolist()
    assert strategy.compute_loss(batch).item() == pytest.approx(
        _hand_grpo_loss(table, ref_table, batch, 0.2, 0.3, scale=False),
        abs=reorder_bound(22 * 5 * 4, scale=10.0))


def test_grpo_logs_rewards_and_zero_variance_groups():
    batch = _group_batch(False)
    strategy = GRPOStrategy(TableLM(0), kl_coef=0.1)
    strategy.compute_loss(batch)
    m = {k: v.item() for k, v in strategy.metrics.items()}
    assert m["reward_mean"] == pytest.approx(batch["rewards"].mean().item())
    assert m["reward_std"] == pytest.approx(batch["rewards"].std(-1, correction=0).mean().item())
    assert m["zero_std_fraction"] == 0.0
    assert m["kl"] == 0.0 and m["clip_fraction"] == 0.0  # policy == reference at the start
    batch["rewards"][1] = 0.5
    strategy.compute_loss(batch)
    assert strategy.metrics["zero_std_fraction"].item() == 0.5


def test_grpo_errors_say_what_to_fix():
    batch = _group_batch(False)
    with pytest.raises(ValueError, match="3 responses per prompt but grpo_group_size is 4"):
        GRPOStrategy(TableLM(0), group_size=4).compute_loss(batch)
    one = {k: v[:, :1] for k, v in batch.items()}
    with pytest.raises(ValueError, match="at least 2 responses"):
        GRPOStrategy(TableLM(0)).compute_loss(one)
    with pytest.raises(ValueError, match="holds prompts only.*rollout_source"):
        GRPOStrategy(TableLM(0)).prepare_batch([{"prompt_ids": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match="clip_eps must be in"):
        GRPOStrategy(TableLM(0), clip_eps=0)


def test_grpo_takes_batches_from_a_rollout_source():
    calls = []

    def source(prompts, policy):
        calls.append((len(prompts), policy))
        return _group_batch(old=True)

    policy = TableLM(0)
    strategy = GRPOStrategy(policy, rollout_source=source)
    batch = strategy.prepare_batch([{"prompt_ids": torch.tensor([1])}] * 2)
    assert calls == [(2, policy)] and "old_log_probs" in batch
    assert torch.isfinite(strategy.compute_loss(batch))


# -- every strategy learns --------------------------------------------------------------------
def _dataset_batch(kind: str, path, n: int = 4):
    dataset = DatasetFactory.load(kind, path, window_size=16 if kind in ("seq", "sft") else None)
    return dataset.collate_fn([dataset[i] for i in range(n)])


@pytest.mark.parametrize(("kind", "kwargs", "drop"), [
    ("seq", {}, 0.5), ("sft", {}, 0.5), ("dpo", {"beta": 0.5}, 0.5),
    ("grpo", {"kl_coef": 0.0, "clip_eps": 0.2}, 0.5),
])
def test_each_strategy_overfits_a_tiny_batch(kind, kwargs, drop, request):
    batch = _dataset_batch(kind, request.getfixturevalue(f"{kind}_file"))
    model = micro_model()
    strategy = StrategyFactory.create(model, kind, "cpu", **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = strategy.compute_loss(batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if kind == "grpo":
        # The offline objective is bounded by the clip: at best every response token sits at
        # its clip edge, which lowers the loss by about clip_eps * E|A| from the start.
        assert losses[-1] < losses[0] - drop * 0.2 * 0.5
        assert strategy.metrics["clip_fraction"].item() > 0.5
    else:
        assert losses[-1] < drop * losses[0]


# -- fused output projection + cross entropy --------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_chunked_linear_cross_entropy_matches_the_plain_path(smoothing, monkeypatch):
    from astrai_train.strategies import linear_ce

    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 64 * 5)  # 5 rows per chunk: many chunks
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True, dtype=torch.float64)
    weight = torch.randn(64, 16, generator=g, requires_grad=True, dtype=torch.float64)
    labels = torch.randint(0, 64, (23,), generator=g)
    rows = torch.rand(23, generator=g, dtype=torch.float64) * (torch.rand(23, generator=g) < 0.7)
    loss = linear_ce.linear_cross_entropy(hidden, weight, labels, rows, smoothing)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    nll = F.cross_entropy(hidden @ weight.T, labels, reduction="none", label_smoothing=smoothing)
    want = (nll * rows).sum()
    want.backward()
    # float64; logits are sums of 16 products of N(0, 1) values (|logit| < 30), 23 x 64 of them.
    tol = reorder_bound(23 * 64 * 16, scale=30.0)
    torch.testing.assert_close(got[0], want.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(got[1], hidden.grad, atol=tol, rtol=0)
    torch.testing.assert_close(got[2], weight.grad, atol=tol, rtol=0)
    with torch.no_grad():  # evaluation: the loss only, no gradient work
        assert linear_ce.linear_cross_entropy(hidden, weight, labels, rows, smoothing).item() == \
            pytest.approx(want.item(), abs=tol)


def test_the_fused_path_is_used_for_transformers_only():
    from astrai_train.strategies.linear_ce import split_lm_head

    model = micro_model()
    assert split_lm_head(model) is not None and split_lm_head(TableLM(0)) is None
    model.compile()  # compiled models run through forward, where the compiled graph is
    assert split_lm_head(model) is None
