"""`astrai rl`: the sub-commands astrai-train adds to the `astrai` CLI for preference and RL data
made by a model (entry-point group `astrai.cli`). Heavy imports wait until a command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

rl_app = typer.Typer(help="Preference and RL data sampled from a model.", no_args_is_help=True)

PAIRS_HELP = """Rewrite a DPO file's rejected replies with the model's own wrong samples (on-policy pairs).

Each prompt gets --samples replies sampled from MODEL_DIR; the most frequent one that is not right becomes the rejected reply of a new pair with the record's chosen reply. Right means the chosen reply itself (whitespace aside) or, with --reward, a reward at least the chosen reply's. Prompts the model always answers right keep their own pair; with --keep-original (the default) every record's own pair stays beside the new one.

Examples:

  astrai rl pairs runs/sft/final --data dpo.jsonl --out dpo_on_policy.jsonl

  astrai rl pairs runs/sft/final --data dpo.jsonl --out pairs.jsonl --samples 8 --reward exact_answer
"""


def read_records(path: Path) -> list[dict[str, Any]]:
    """DPO records of a JSONL file, checked before any model loads: a line that is not one is
    an error naming FILE:LINE."""
    from astrai_train.rl.pairs import prompt_messages

    if not path.is_file():
        raise FileNotFoundError(f"{path}: preference file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: a record must be a JSON object")
            prompt_messages(record, f"{path}:{n}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def pairs_cmd(
    model_dir: Path = typer.Argument(..., help="The policy: a model folder with its tokenizer (an SFT checkpoint).", show_default=False),
    data: Path = typer.Option(..., "--data", help="DPO records (JSONL: prompt or messages, chosen, rejected).", show_default=False),
    out: Path = typer.Option(..., "--out", help="The JSONL file to write.", show_default=False),
    samples: int = typer.Option(4, "--samples", min=1, help="Sampled replies per prompt."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (0, 1]."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Tokens per sampled reply at most."),
    reward: str | None = typer.Option(None, "--reward", help="Judge replies by a reward (a built-in name such as exact_answer, or module:function) instead of equality with the chosen reply."),
    keep_original: bool = typer.Option(True, "--keep-original/--replace", help="Keep each record's own pair beside its on-policy one, or replace it."),
    seed: int = typer.Option(0, "--seed", help="Seed of the samples (the same file every run)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    from rich.console import Console

    from astrai_train.evaluation.models import load_eval_model
    from astrai_train.rl.pairs import (
        PairConfig,
        on_policy_pairs,
        reward_judge,
        same_reply,
        write_pairs,
    )

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or another --out")
    config = PairConfig(samples=samples, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_tokens, seed=seed, keep_original=keep_original)
    judge = reward_judge(reward) if reward else same_reply
    records = read_records(data)
    policy = load_eval_model(model_dir, device, dtype)
    written, report = on_policy_pairs(policy.model, policy.tokenizer, records, config, judge)
    write_pairs(out, written)
    Console().print(f"{report.summary()}: {out}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    rl_app.command("pairs", help=PAIRS_HELP, no_args_is_help=True)(pairs_cmd)
    app.add_typer(rl_app, name="rl")
