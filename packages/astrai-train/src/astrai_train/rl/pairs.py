"""On-policy preference pairs: the policy's own wrong replies as DPO's rejected side.

A preference file written ahead of training pairs each prompt with a fixed rejected reply, most
of which the model would never give (the wrong language, a cut-off sentence). The pairs a
trained model still ranks wrong are the questions it answers wrong with confidence. Sampling the
policy and pairing the reference reply (chosen) with a sampled reply that is not right puts
DPO's gradient on the model's own errors: SPIN's idea (Chen et al. 2024, "Self-Play
Fine-Tuning": the model's generations against the SFT data's replies) with a judge, so that a
right sample is never made the rejected side.

    records, report = on_policy_pairs(model, tokenizer, records, PairConfig(samples=4))

Each record keeps its prompt and chosen reply; its rejected reply becomes the most frequent
wrong sample (the model's modal error). With `keep_original` (the default) the record's own
pair stays too, so the file keeps what the fixed pairs teach.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from astrai_core import atomic_file
from astrai_data.prepare.records import InvalidRecord, parse_dpo
from astrai_train.rl.extra import require_serve
from astrai_train.rl.rewards import RewardSpec, build_reward

# judge(record, reply) -> True when `reply` is a right answer to the record's prompt
Judge = Callable[[dict[str, Any], str], bool]


@dataclass(frozen=True)
class PairConfig:
    samples: int = 4  # sampled replies per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0  # sample i of prompt p uses seed + p * samples + i: the same file every run
    # concurrent sequences in the engine: a small model's decode step costs about the same for
    # 64 rows or 256 (heldout.GENERATE_BATCH); the window is only prompt + reply
    max_batch_size: int = 256
    keep_original: bool = True  # keep each record's own pair beside its on-policy one

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy replies repeat one answer), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class PairReport:
    prompts: int = 0
    samples: int = 0
    wrong_samples: int = 0
    on_policy: int = 0  # prompts that got an on-policy pair (a wrong sample)
    records: int = 0  # records written

    def summary(self) -> str:
        share = self.on_policy / self.prompts if self.prompts else 0.0
        return (f"{self.on_policy} of {self.prompts} prompts ({share:.0%}) had a wrong sample "
                f"({self.wrong_samples} of {self.samples} samples); {self.records} records")


def same_reply(record: dict[str, Any], reply: str) -> bool:
    """The default judge: right only when it is the chosen reply (whitespace aside)."""
    return reply.strip() == str(record["chosen"]).strip()


def reward_judge(reward: RewardSpec) -> Judge:
    """Right when the reply scores at least what the chosen reply scores under `reward`
    (reward(prompt, response, **record), as for GRPO)."""
    fn = build_reward(reward)

    def judge(record: dict[str, Any], reply: str) -> bool:
        prompt = record.get("prompt", "")
        fields = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
        return fn(prompt, reply, **fields) >= fn(prompt, record["chosen"], **fields)

    return judge


def prompt_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The record's prompt as chat messages; a record that is not a DPO pair is an error."""
    try:
        return parse_dpo(record).messages
    except InvalidRecord as exc:
        raise ValueError(f"{where}: {exc} (a preference record has 'prompt' or 'messages', "
                         "'chosen' and 'rejected')") from exc


def on_policy_pairs(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]],
                    config: PairConfig | None = None, judge: Judge = same_reply
                    ) -> tuple[list[dict[str, Any]], PairReport]:
    """-> (preference records with the policy's wrong samples as rejected replies, report)."""
    serve = require_serve()
    config = config or PairConfig()
    prompts = [tokenizer.apply_chat_template(prompt_messages(r, f"record {i + 1}"),
                                             add_generation_prompt=True)
               for i, r in enumerate(records)]
    report = PairReport(prompts=len(records), samples=len(records) * config.samples)
    if not records:
        return [], report
    texts = _sample(serve, model, tokenizer, prompts, config)
    out: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        replies = texts[i * config.samples:(i + 1) * config.samples]
        wrong = [t for t in replies if t and not judge(record, t)]
        report.wrong_samples += len(wrong)
        if config.keep_original or not wrong:
            out.append(dict(record))
        if wrong:
            report.on_policy += 1
            # most_common keeps first-seen order among ties: the earliest sample wins
            out.append({**record, "rejected": Counter(wrong).most_common(1)[0][0]})
    report.records = len(out)
    return out, report


def write_pairs(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """JSONL, written atomically: an interrupted run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                       encoding="utf-8")


def _sample(serve: Any, model: nn.Module, tokenizer: Any, prompts: list[list[int]],
            config: PairConfig) -> list[str]:
    """`config.samples` decoded replies per prompt, grouped by prompt."""
    window = model.config.max_seq_len
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) >= window:
        raise ValueError(f"record {longest + 1}: its prompt is {len(prompts[longest])} tokens, "
                         f"the model's window {window}; shorten it or drop the record")
    max_seq_len = min(window, len(prompts[longest]) + config.max_new_tokens + 1)
    params = serve.SamplingParams(max_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, seed=config.seed)
    was_training = model.training
    model.eval()
    try:
        with serve.InferenceEngine(model, tokenizer, max_batch_size=config.max_batch_size,
                                   max_seq_len=max_seq_len,
                                   kv_cache_tokens=config.max_batch_size * max_seq_len) as engine:
            flat = [p for p in prompts for _ in range(config.samples)]
            # One request per sample, all queued at once: the same file every run.
            requests = engine.submit_many(flat, [params.for_sample(i) for i in range(len(flat))])
            results = [r.wait_completion() for r in requests]
    finally:
        model.train(was_training)
    return [tokenizer.decode(r.token_ids, skip_special_tokens=True).strip() for r in results]
