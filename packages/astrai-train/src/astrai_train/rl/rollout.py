"""`EngineRolloutSource`: online GRPO rollouts from the live policy through astrai-serve.

Each call samples G responses per prompt with the policy's current weights (the engine runs
the very same module: no copy, nothing through disk), scores them with the reward, and returns
a GRPO batch in the layout of the offline data (docs/contracts.md):

    input_ids, labels, loss_mask, attention_mask   (B, G, T)  prompt + response, shifted by one
    rewards                                        (B, G)
    old_log_probs                                  (B, G, T)  log-probs of the sampling policy

`old_log_probs` come from a no-grad forward of the policy on the sampled sequences, the same
computation the loss does, so the ratio is exactly 1 before the first update of a rollout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from astrai_train.parallel.wrap import is_fsdp
from astrai_train.rl.extra import require_serve
from astrai_train.rl.rewards import RewardSpec, build_reward
from astrai_train.strategies.base import Batch
from astrai_train.strategies.logprobs import token_log_probs

DEFAULT_GROUP_SIZE = 4  # responses per prompt when grpo_group_size is unset


@dataclass(frozen=True)
class RolloutConfig:
    group_size: int = DEFAULT_GROUP_SIZE  # responses per prompt (G)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # mixed into each rollout's seeds (drawn from torch's global RNG)
    max_batch_size: int = 64  # concurrent sequences in the engine
    # Off by default: with it, a group's later samples wait for the first one's prompt pages,
    # which ties the step they run in to thread timing; without it a seeded rollout is
    # reproducible bit for bit. Turn it on for long shared prompts.
    enable_prefix_cache: bool = False
    # The sampling policy's log-probs, for a caller that updates more than once per rollout
    # (its ratio's denominator); the trainer updates once and skips them (one forward less).
    old_log_probs: bool = True

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"GRPO group_size must be >= 2, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"rollout temperature must be > 0 (GRPO needs varied responses), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Rollout:
    """One sampled response: its ids (ending with the stop token when it stopped), text, reward."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    reward: float


def unwrap(policy: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    while True:
        inner = getattr(policy, "module", None) or getattr(policy, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return policy
        policy = inner


class EngineRolloutSource:
    """RolloutSource(prompts, policy) -> GRPO batch. Use as a context manager, or call close().

    `tokenizer` decodes responses for the reward and gives the stop ids (an `AutoTokenizer`);
    `reward` is a function reward(prompt, response, **record) -> float, a built-in name,
    `module:function`, or several of those (averaged); `pad_id` defaults to the tokenizer's.
    """

    def __init__(self, tokenizer: Any, reward: RewardSpec, config: RolloutConfig | None = None,
                 pad_id: int | None = None) -> None:
        self.serve = require_serve()
        self.tokenizer = tokenizer
        self.reward = build_reward(reward)
        self.config = config or RolloutConfig()
        self.pad_id = pad_id if pad_id is not None else (getattr(tokenizer, "pad_id", None) or 0)
        self.calls = 0
        self._engine: Any = None
        self._engine_model: nn.Module | None = None
        self.last_rollouts: list[Rollout] = []

    # -- lifetime ----------------------------------------------------------------------------
    def __enter__(self) -> EngineRolloutSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
        self._engine, self._engine_model = None, None

    def _engine_for(self, model: nn.Module) -> Any:
        if self._engine_model is not model:
            self.close()
            cfg = self.config
            self._engine = self.serve.InferenceEngine(
                model, self.tokenizer, max_batch_size=cfg.max_batch_size,
                kv_cache_tokens=cfg.max_batch_size * min(model.config.max_seq_len, 256 + cfg.max_new_tokens),
                enable_prefix_cache=cfg.enable_prefix_cache)
            self._engine_model = model
        return self._engine

    # -- a rollout ---------------------------------------------------------------------------
    def __call__(self, prompts: list[dict[str, Any]], policy: nn.Module) -> Batch:
        model = unwrap(policy)
        if is_fsdp(model):
            raise ValueError("online GRPO cannot sample from an FSDP-sharded policy (ranks would "
                             "generate different lengths in lockstep); use parallel=ddp or none")
        was_training = model.training
        model.eval()
        try:
            rollouts = self.sample(prompts, model)
            batch = self.to_batch(rollouts, len(prompts))
            if self.config.old_log_probs:
                device = next(model.parameters()).device
                with torch.no_grad():
                    B, G, T = batch["input_ids"].shape
                    old = token_log_probs(model, batch["input_ids"].view(B * G, T).to(device),
                                          batch["labels"].view(B * G, T).to(device))
                batch["old_log_probs"] = old.view(B, G, T).cpu()
        finally:
            model.train(was_training)
        self.calls += 1
        self.last_rollouts = rollouts
        return batch

    def sample(self, prompts: list[dict[str, Any]], model: nn.Module) -> list[Rollout]:
        """G sampled, scored responses per prompt, grouped by prompt."""
        cfg = self.config
        engine = self._engine_for(model)
        engine.reset_prefix_cache()  # the weights changed since the last rollout
        ids = [[int(t) for t in p["prompt_ids"]] for p in prompts]
        # Drawn from torch's global generator, which checkpoints save and restore: a resumed
        # run samples the same responses as one never interrupted.
        base = cfg.seed * 1_000_003 + int(torch.randint(0, 2**31 - 1, ()))
        params = [self.serve.SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            top_p=cfg.top_p, seed=base + i)
                  for i in range(len(ids) * cfg.group_size)]
        flat = [p for p in ids for _ in range(cfg.group_size)]
        results = [r.wait_completion() for r in engine.submit_many(flat, params)]
        rollouts = []
        for i, result in enumerate(results):
            item = prompts[i // cfg.group_size]
            text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
            record = {k: v for k, v in item.items() if k not in ("prompt", "prompt_ids")}
            score = float(self.reward(item.get("prompt", ""), text, **record))
            rollouts.append(Rollout(flat[i], list(result.token_ids), text, score))
        return rollouts

    def to_batch(self, rollouts: list[Rollout], n_prompts: int) -> Batch:
        G = self.config.group_size
        rows = [r.prompt_ids + r.response_ids for r in rollouts]
        T = max(len(r) for r in rows) - 1
        shape = (n_prompts, G, T)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(shape, dtype=torch.bool)
        attention_mask = torch.zeros(shape, dtype=torch.bool)
        for i, (rollout, row) in enumerate(zip(rollouts, rows, strict=True)):
            b, g, n = i // G, i % G, len(row) - 1
            seq = torch.tensor(row, dtype=torch.long)
            input_ids[b, g, :n], labels[b, g, :n] = seq[:-1], seq[1:]
            attention_mask[b, g, :n] = True
            # Labels from the last prompt token on are the response (its stop token included:
            # the model must learn to end).
            loss_mask[b, g, len(rollout.prompt_ids) - 1:n] = True
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32).view(n_prompts, G)
        return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
                "attention_mask": attention_mask, "rewards": rewards}
