"""Held-out scoring of a chat model on the synthetic corpus's evaluation files, per language
(the quickstart's table; `astrai eval` runs the same functions):

- loss: mean cross-entropy per reply token of the held-out chats (`eval_sft.jsonl`), with the
  chat template, on the assistant replies only;
- accuracy: greedy replies to those chats' questions; a numeric task counts when the reply's
  answer equals the reference (by value), any other task when the reply is the reference reply;
- preference accuracy: held-out pairs (`eval_dpo.jsonl`) the model ranks right, summed
  log-probability of the chosen reply above the rejected one; with a reference model, also
  DPO's reward margin beta * (log-ratio of chosen - log-ratio of rejected) against it;
- reward: mean GRPO reward of greedy replies to held-out verifiable prompts (`eval_grpo.jsonl`).

The eval files hold only held-out number pairs and question phrasings (see the corpus manifest);
no training file contains them.
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
GENERATE_BATCH = 256  # concurrent sequences of the engine that generates the replies


@dataclass
class HeldOutScores:
    """One row of the table: per-language scores of one model (a stage of the quickstart)."""

    stage: str
    loss: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    preference: dict[str, float] = field(default_factory=dict)  # preference accuracy
    margin: dict[str, float] = field(default_factory=dict)  # DPO reward margin vs the reference
    reward: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # lang -> task -> accuracy
    # preference_gaps on the held-out pairs: the next stages' reference (not in the report)
    pair_gaps: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "loss": self.loss, "accuracy": self.accuracy,
                "preference": self.preference, "margin": self.margin, "reward": self.reward,
                "tasks": self.tasks}


@dataclass
class HeldOutSet:
    """The three held-out files of a corpus folder (any may be empty)."""

    chats: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    prompts: list[dict[str, Any]]

    @classmethod
    def load(cls, folder: Path, limit: int | None = None) -> HeldOutSet:
        def read(name: str) -> list[dict[str, Any]]:
            path = folder / name
            return read_jsonl(path, limit) if path.is_file() else []

        return cls(read("eval_sft.jsonl"), read("eval_dpo.jsonl"), read("eval_grpo.jsonl"))


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file; `limit` keeps that many per language (the files are balanced
    by language and task, so a prefix of each language stays balanced)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if limit is None:
        return rows
    kept: dict[str, int] = defaultdict(int)
    out = []
    for row in rows:
        lang = row.get("lang", "")
        if kept[lang] < limit:
            kept[lang] += 1
            out.append(row)
    return out


def reply_is_correct(reply: str, reference: str, task: str) -> bool:
    if task in NUMERIC_TASKS:
        expected = extract_answer(reference)
        return expected is not None and extract_answer(reply) == expected
    return reply.strip() == reference.strip()


def mean_by_lang(values: Sequence[float], langs: Sequence[str]) -> dict[str, float]:
    total, count = defaultdict(float), defaultdict(int)
    for value, lang in zip(values, langs, strict=True):
        total[lang] += value
        count[lang] += 1
    return {lang: total[lang] / count[lang] for lang in LANGS if count[lang]}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: Sequence[tuple[list[int], list[int]]], device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row_ids, row_mask) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        mask[i, :len(row_mask)] = torch.tensor(row_mask, dtype=torch.bool)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def reply_token_logprobs(model: nn.Module, tokenizer: Any, conversations: Sequence[list[dict]],
                         batch_size: int = 32) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of the assistant replies of each conversation."""
    encoded = [tokenizer.apply_chat_template_with_mask(messages) for messages in conversations]
    out = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = _pad(encoded[start:start + batch_size], _device(model))
        logp = token_log_probs(model, ids[:, :-1], ids[:, 1:])
        target = mask[:, 1:]
        out += [(float(logp[i][target[i]].sum()), int(target[i].sum())) for i in range(len(ids))]
    return out


def reply_loss(model: nn.Module, tokenizer: Any, chats: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Token-weighted mean cross-entropy on assistant tokens, per language."""
    nll, count = defaultdict(float), defaultdict(int)
    scored = reply_token_logprobs(model, tokenizer, [c["messages"] for c in chats])
    for (logp, n), chat in zip(scored, chats, strict=True):
        nll[chat["lang"]] -= logp
        count[chat["lang"]] += n
    return {lang: nll[lang] / count[lang] for lang in LANGS if count[lang]}


def greedy_replies(model: nn.Module, tokenizer: Any, conversations: Sequence[list[dict[str, str]]],
                   max_new_tokens: int) -> list[str]:
    """Greedy replies through astrai-serve's engine (batched, paged KV cache)."""
    from astrai_serve import InferenceEngine, SamplingParams

    prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True)
               for messages in conversations]
    longest = max(len(p) for p in prompts) + max_new_tokens
    max_seq_len = min(model.config.max_seq_len, longest + 1)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    try:
        # 256 at once: a small model's decode step costs about the same for 64 rows or 256
        # (2,000 sampled replies of the quickstart's model: 7.6 s at 64, 5.5 s at 256, 2 cores);
        # the window is the longest prompt plus the reply, so the cache stays small
        with InferenceEngine(model, tokenizer, max_batch_size=GENERATE_BATCH,
                             max_seq_len=max_seq_len,
                             kv_cache_tokens=GENERATE_BATCH * max_seq_len) as engine:
            results = engine.generate_ids(prompts, params)
    finally:
        model.train(was_training)
    return [tokenizer.decode(r.token_ids, skip_special_tokens=True).strip() for r in results]


def chat_accuracy(model: nn.Module, tokenizer: Any, chats: Sequence[dict[str, Any]],
                  max_new_tokens: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """-> (accuracy per language, accuracy per language and task)."""
    replies = greedy_replies(model, tokenizer, [c["messages"][:-1] for c in chats], max_new_tokens)
    correct = [float(reply_is_correct(r, c["messages"][-1]["content"], c["task"]))
               for r, c in zip(replies, chats, strict=True)]
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for ok, chat in zip(correct, chats, strict=True):
        by_task[chat["lang"]][chat["task"]].append(ok)
    tasks = {lang: {task: sum(v) / len(v) for task, v in sorted(per.items())}
             for lang, per in by_task.items()}
    return mean_by_lang(correct, [c["lang"] for c in chats]), tasks


def _pair_conversations(pair: dict[str, Any], side: str) -> list[dict[str, str]]:
    prompt = pair.get("messages") or [{"role": "user", "content": pair["prompt"]}]
    return [*prompt, {"role": "assistant", "content": pair[side]}]


def preference_gaps(model: nn.Module, tokenizer: Any, pairs: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Summed log-probability of each pair's chosen reply minus its rejected one's (float64)."""
    def logps(side: str) -> torch.Tensor:
        scored = reply_token_logprobs(model, tokenizer, [_pair_conversations(p, side) for p in pairs])
        return torch.tensor([s for s, _ in scored], dtype=torch.float64)

    return logps("chosen") - logps("rejected")


def preference_scores(model: nn.Module, tokenizer: Any, pairs: Sequence[dict[str, Any]],
                      reference: nn.Module | None = None, beta: float = 0.1,
                      reference_gaps: torch.Tensor | None = None
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """-> (preference accuracy, reward margin) per language; the margin needs `reference` (or
    its `preference_gaps` on the same pairs, which spares scoring it again)."""
    if reference_gaps is None and reference is not None:
        reference_gaps = preference_gaps(reference, tokenizer, pairs)
    return preference_metrics(preference_gaps(model, tokenizer, pairs), pairs, reference_gaps, beta)


def preference_metrics(gaps: torch.Tensor, pairs: Sequence[dict[str, Any]],
                       reference_gaps: torch.Tensor | None = None, beta: float = 0.1
                       ) -> tuple[dict[str, float], dict[str, float]]:
    """Preference accuracy and (with the reference's gaps) reward margin from a model's gaps."""
    langs = [p["lang"] for p in pairs]
    accuracy = mean_by_lang((gaps > 0).double().tolist(), langs)
    if reference_gaps is None:
        return accuracy, {}
    return accuracy, mean_by_lang((beta * (gaps - reference_gaps)).tolist(), langs)


def mean_reward(model: nn.Module, tokenizer: Any, prompts: Sequence[dict[str, Any]],
                reward: Callable[..., float], max_new_tokens: int) -> dict[str, float]:
    answers = greedy_replies(model, tokenizer,
                             [[{"role": "user", "content": p["prompt"]}] for p in prompts],
                             max_new_tokens)
    scores = [reward(p["prompt"], a, **{k: v for k, v in p.items() if k != "prompt"})
              for a, p in zip(answers, prompts, strict=True)]
    return mean_by_lang(scores, [p["lang"] for p in prompts])


def score_model(stage: str, model: nn.Module, tokenizer: Any, data: HeldOutSet,
                reward: Callable[..., float], max_new_tokens: int,
                reference: nn.Module | None = None, beta: float = 0.1,
                generate: bool = True, reference_gaps: torch.Tensor | None = None) -> HeldOutScores:
    """Every score of one model; `generate=False` skips those that sample replies (accuracy,
    reward): what a model that cannot chat yet (random weights) is measured on.
    `reference_gaps`: the reference's `preference_gaps` on `data.pairs`, in place of scoring
    `reference` again."""
    scores = HeldOutScores(stage)
    if data.chats:
        scores.loss = reply_loss(model, tokenizer, data.chats)
    if data.pairs:
        if reference_gaps is None and reference is not None:
            reference_gaps = preference_gaps(reference, tokenizer, data.pairs)
        scores.pair_gaps = preference_gaps(model, tokenizer, data.pairs)
        scores.preference, scores.margin = preference_metrics(scores.pair_gaps, data.pairs,
                                                              reference_gaps, beta)
    if generate and data.chats:
        scores.accuracy, scores.tasks = chat_accuracy(model, tokenizer, data.chats, max_new_tokens)
    if generate and data.prompts:
        scores.reward = mean_reward(model, tokenizer, data.prompts, reward, max_new_tokens)
    return scores
