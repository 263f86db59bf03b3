"""Held-out evaluation of a quickstart stage, per language:

- loss: mean cross-entropy per reply token of the held-out chats (`eval_sft.jsonl`), with the
  chat template, on the assistant replies only;
- accuracy: greedy replies to those chats' questions; a numeric task counts when the reply's
  answer equals the reference, a fact task when the reply is the reference reply;
- reward: mean GRPO reward (the same functions the GRPO stage trains on) of greedy replies to
  the held-out verifiable prompts (`eval_grpo.jsonl`).

The `eval_*` files hold only held-out keys and question templates (see the corpus manifest);
no training stage reads them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from astrai_data import NUMERIC_TASKS, extract_answer
from astrai_train.strategies.logprobs import token_log_probs

LANGS = ("en", "zh")


@dataclass
class StageMetrics:
    """One row of the quickstart table: per-language loss, accuracy and mean reward."""

    stage: str
    loss: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    reward: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "loss": self.loss, "accuracy": self.accuracy,
                "reward": self.reward}


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit is not None else rows


def reply_is_correct(reply: str, reference: str, task: str) -> bool:
    if task in NUMERIC_TASKS:
        expected = extract_answer(reference)
        return expected is not None and extract_answer(reply) == expected
    return reply.strip() == reference.strip()


@torch.no_grad()
def reply_loss(model: nn.Module, tokenizer: Any, chats: Sequence[dict[str, Any]],
               device: torch.device, batch_size: int = 32) -> dict[str, float]:
    """Token-weighted mean cross-entropy on assistant tokens, per language."""
    nll, count = defaultdict(float), defaultdict(int)
    encoded = [(*tokenizer.apply_chat_template_with_mask(c["messages"]), c["lang"]) for c in chats]
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (row_ids, row_mask, _) in enumerate(rows):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            mask[i, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
        ids, mask = ids.to(device), mask.to(device)
        losses = -token_log_probs(model, ids[:, :-1], ids[:, 1:])
        target = mask[:, 1:]
        for i, (_, _, lang) in enumerate(rows):
            nll[lang] += float(losses[i][target[i]].sum())
            count[lang] += int(target[i].sum())
    return {lang: nll[lang] / count[lang] for lang in LANGS if count[lang]}


def greedy_replies(model: nn.Module, tokenizer: Any, conversations: Sequence[list[dict[str, str]]],
                   max_new_tokens: int) -> list[str]:
    """Greedy replies through astrai-serve's engine (batched, paged KV cache)."""
    from astrai_serve import InferenceEngine, SamplingParams

    prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True)
               for messages in conversations]
    longest = max(len(p) for p in prompts) + max_new_tokens
    max_len = min(model.config.max_len, longest + 1)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    try:
        with InferenceEngine(model, tokenizer, max_batch_size=64, max_seq_len=max_len,
                             kv_cache_tokens=64 * max_len) as engine:
            results = engine.generate_ids(prompts, params)
    finally:
        model.train(was_training)
    return [tokenizer.decode(r.token_ids, skip_special_tokens=True).strip() for r in results]


def mean_by_lang(values: Sequence[float], langs: Sequence[str]) -> dict[str, float]:
    total, count = defaultdict(float), defaultdict(int)
    for value, lang in zip(values, langs, strict=True):
        total[lang] += value
        count[lang] += 1
    return {lang: total[lang] / count[lang] for lang in LANGS if count[lang]}


def evaluate_stage(stage: str, model: nn.Module, tokenizer: Any, chats: list[dict[str, Any]],
                   prompts: list[dict[str, Any]], reward: Callable[..., float],
                   max_new_tokens: int) -> StageMetrics:
    device = next(model.parameters()).device
    metrics = StageMetrics(stage, loss=reply_loss(model, tokenizer, chats, device))
    questions = [c["messages"][:-1] for c in chats]
    replies = greedy_replies(model, tokenizer, questions, max_new_tokens)
    correct = [float(reply_is_correct(r, c["messages"][-1]["content"], c["task"]))
               for r, c in zip(replies, chats, strict=True)]
    metrics.accuracy = mean_by_lang(correct, [c["lang"] for c in chats])
    answers = greedy_replies(model, tokenizer,
                             [[{"role": "user", "content": p["prompt"]}] for p in prompts],
                             max_new_tokens)
    scores = [reward(p["prompt"], a, **{k: v for k, v in p.items() if k != "prompt"})
              for a, p in zip(answers, prompts, strict=True)]
    metrics.reward = mean_by_lang(scores, [p["lang"] for p in prompts])
    return metrics
