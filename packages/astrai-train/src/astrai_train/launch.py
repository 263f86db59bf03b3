"""What `astrai train` does between parsing and training: merge the option layers, locate the
checkpoint to resume, build the model, the dataset and the `TrainConfig`, and estimate the run.

Option layers, later ones win: TrainConfig defaults < OUT/launch.json (the options of the run
being resumed, with --resume) < the --config TOML file < command-line flags.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from astrai_core import AutoModel, AutoTokenizer, Checkpoint, Transformer, atomic_file, get_preset
from astrai_core.deprecation import rename_keys
from astrai_data import DatasetFactory, ResumableDistributedSampler, open_storage
from astrai_train.builder import count_total_steps, resolve_device
from astrai_train.config import RENAMED_FIELDS, RENAMED_FLAGS, TrainConfig
from astrai_train.resume import find_latest_checkpoint, load_latest_intact
from astrai_train.strategies.base import count_tokens

LAUNCH_FILE = "launch.json"
# Options of `astrai train` that are not TrainConfig fields.
RUN_OPTIONS = ("data", "model", "preset", "max_seq_len", "stride")
FIELDS = {f.name for f in TrainConfig.value_fields()}
KNOWN_KEYS = FIELDS | set(RUN_OPTIONS)
# Keys of the previous release: option names that were not the field's, and renamed fields.
OLD_KEYS = {**RENAMED_FIELDS, **RENAMED_FLAGS}


@dataclass
class LaunchOptions:
    out: Path
    data: Path
    model: Path | None = None
    preset: str | None = None
    max_seq_len: int | None = None  # tokens per sample (seq/sft default: the model's window)
    stride: int | None = None
    resume: bool = False
    values: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> value


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML ({exc})") from None
    data = rename_keys(data, OLD_KEYS, str(path))
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; keys are the option names "
                         "of `astrai train --help` with underscores (e.g. batch_size, out)")
    return data


def merge_options(flags: dict[str, Any], config_file: Path | None, resume: bool) -> LaunchOptions:
    """Layer launch.json (when resuming), the TOML file and the flags given (non-None)."""
    given = {k: v for k, v in flags.items() if v is not None}
    top = {**(read_toml(config_file) if config_file else {}), **given}
    if "out" not in top:
        raise ValueError("--out is required: the folder for checkpoints and logs")
    out = Path(top["out"])
    base = _read_launch(out) if resume else {}
    merged = {**base, **top}
    if "data" not in merged:
        raise ValueError("--data is required: a dataset file prepared by `astrai data prepare`")
    values = {k: v for k, v in merged.items() if k in FIELDS}
    values["out"] = str(out)
    run = {k: merged.get(k) for k in RUN_OPTIONS}
    for key in ("data", "model"):
        run[key] = Path(run[key]) if run[key] is not None else None
    return LaunchOptions(out=out, resume=resume, values=values, **run)


def _read_launch(out: Path) -> dict[str, Any]:
    path = out / LAUNCH_FILE
    if not path.is_file():
        return {}
    # Written by the previous release: keys were flag names then (--window-size, ...).
    return rename_keys(json.loads(path.read_text()), OLD_KEYS, str(path), warn=False)


def write_launch(opts: LaunchOptions, config: TrainConfig) -> None:
    """Record the options of this run in OUT, so `--resume` needs only --out."""
    data = {name: getattr(opts, name) for name in RUN_OPTIONS}
    # Absolute paths: a resumed run may start from another working directory.
    data = {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in data.items()
            if v is not None}
    data.update({k: v for k, v in config.to_dict().items() if v is not None})
    if config.tokenizer is not None:
        data["tokenizer"] = str(Path(config.tokenizer).resolve())
    opts.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(opts.out / LAUNCH_FILE) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def locate_checkpoint(opts: LaunchOptions, notes: list[str] | None = None) -> Checkpoint | None:
    """The checkpoint to resume (the newest intact one; `notes` gets a line per corrupt one
    skipped), or None for a fresh run in an empty --out."""
    if opts.resume:
        checkpoint, skipped = load_latest_intact(opts.out)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {opts.out}; drop --resume to "
                                    "start a new run there")
        if notes is not None:
            notes.extend(skipped)
        return checkpoint
    latest = find_latest_checkpoint(opts.out)
    if latest is not None:
        raise FileExistsError(f"{opts.out} already holds checkpoints (latest: {latest.name}); "
                              "pass --resume to continue that run, or choose another --out")
    return None


def build_model(opts: LaunchOptions, seed: int) -> tuple[nn.Module, Path | None]:
    """-> (model in fp32, folder of the tokenizer files to copy into checkpoints)."""
    if (opts.model is None) == (opts.preset is None):
        raise ValueError("pass exactly one of --model DIR (start from a model folder) or "
                         "--preset NAME --tokenizer DIR (start from random weights)")
    tokenizer = opts.values.get("tokenizer")
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    if opts.model is not None:
        has_tokenizer = (opts.model / "tokenizer.json").is_file()
        if tokenizer is None and not has_tokenizer:
            # Checkpoints without a tokenizer cannot be served or trained on further: refuse now.
            raise ValueError(f"--model {opts.model} has no tokenizer (tokenizer.json), so its "
                             "checkpoints could not be served; pass --tokenizer DIR (the folder "
                             "of the tokenizer the model was trained with)")
        if tokenizer is not None:
            tokenizer_vocab_size(tokenizer)  # a wrong --tokenizer fails now, not at the end
        model = AutoModel.from_pretrained(opts.model, dtype="float32")
        return model, tokenizer or opts.model
    if tokenizer is None:
        raise ValueError(f"--preset {opts.preset} needs --tokenizer DIR: the vocabulary size "
                         "comes from it, and checkpoints include it so they can be served")
    return preset_model(opts.preset, tokenizer, seed), tokenizer


def preset_model(preset: str, tokenizer: Path, seed: int) -> Transformer:
    """The random initial weights a run from `--preset` starts from (the same for a seed)."""
    config = get_preset(preset, vocab_size=tokenizer_vocab_size(tokenizer))
    torch.manual_seed(seed)
    return Transformer(config)


def tokenizer_vocab_size(folder: Path) -> int:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; --tokenizer must be a tokenizer folder "
                                "(e.g. from `astrai tokenizer train`)")
    return int(AutoTokenizer.from_pretrained(folder).vocab_size)


def build_config(opts: LaunchOptions) -> TrainConfig:
    config = TrainConfig.from_dict(opts.values)  # every value is checked before loading anything
    model, tok_dir = build_model(opts, config.seed)
    if not opts.data.is_file():
        raise FileNotFoundError(f"--data {opts.data} does not exist; prepare one with "
                                "`astrai data prepare`")
    kind = data_kind(config, opts.data)
    window = opts.max_seq_len
    if window is None and kind in ("seq", "sft"):
        window = model.config.max_seq_len  # one context window per sample
    dataset = DatasetFactory.load(kind, opts.data, window_size=window, stride=opts.stride)
    return config.replace(model=model, dataset=dataset,
                          tokenizer=str(tok_dir) if tok_dir is not None else None)


def data_kind(config: TrainConfig, path: Path) -> str:
    """The dataset kind the strategy reads: its own, except distill (the file's, seq or sft)
    and online dpo (a prompts file, prepared as for online grpo)."""
    if config.strategy != "distill" and not (config.strategy == "dpo" and config.online):
        return config.strategy
    kind = open_storage(path).kind
    if config.strategy == "distill" and kind not in ("seq", "sft"):
        raise ValueError(f"--strategy distill trains on seq or sft data, but {path} holds "
                         f"'{kind}' data; prepare it with `astrai data prepare --strategy seq` "
                         "(or sft)")
    if config.strategy == "dpo" and kind != "grpo":
        raise ValueError(f"--online dpo samples responses to prompts, but {path} holds '{kind}' "
                         "data; prepare prompts with `astrai data prepare --strategy grpo` from "
                         "prompt records, or drop --online to train on preference pairs")
    return kind


@dataclass
class RunEstimate:
    parameters: int
    tokens_per_step: int
    total_steps: int
    done_steps: int
    seconds: float | None


def estimate_run(config: TrainConfig, checkpoint: Checkpoint | None) -> RunEstimate:
    dataset, model = config.dataset, config.model
    sampler = ResumableDistributedSampler(len(dataset), config.batch_size, seed=config.seed)
    total = count_total_steps(config, sampler)
    done = checkpoint.iteration if checkpoint is not None else 0
    sample = [dataset[i] for i in range(config.batch_size)]
    per_sample = sum(item_tokens(config, item) for item in sample) / len(sample)
    tokens = round(per_sample * config.batch_size * config.accumulation_steps)
    step_s = probe_step_seconds(config, sample)
    seconds = None if step_s is None else step_s * max(total - done, 0)
    return RunEstimate(model.num_parameters() if hasattr(model, "num_parameters")
                       else sum(p.numel() for p in model.parameters()), tokens, total, done, seconds)


def item_tokens(config: TrainConfig, item: dict[str, Any]) -> int:
    """Tokens one sample contributes; an online GRPO prompt: G responses, each at most
    max_new_tokens long (so an upper bound)."""
    if "prompt_ids" not in item:
        return count_tokens(item)
    from astrai_train.rl.rollout import DEFAULT_GROUP_SIZE

    group = config.grpo_group_size or DEFAULT_GROUP_SIZE
    trained = group if config.strategy == "grpo" else 2  # online dpo: the best and worst
    return trained * (len(item["prompt_ids"]) + config.rollout_max_tokens)


def probe_step_seconds(config: TrainConfig, items: list[dict[str, Any]]) -> float | None:
    """Time the forward+backward of one micro-batch (best of two) on the training device, with
    the RNG forked and gradients cleared, so the run itself is not changed by it."""
    model = config.model.to(resolve_device(config.device))
    device = next(model.parameters()).device
    ids = [v for item in items for k, v in item.items() if k.endswith("input_ids")]
    if not ids or not all(isinstance(t, torch.Tensor) for t in ids):
        return None  # prompt-only data: generation dominates and is not measured here
    rows = [t.reshape(-1, t.shape[-1]) for t in ids]
    width = max(r.shape[-1] for r in rows)
    batch = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows]).to(device)
    best = float("inf")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(2):
            t0 = time.perf_counter()
            model(batch).float().logsumexp(-1).mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    # Reference (teacher) forward passes cost about a third of a forward+backward more.
    ref_cost = 4 / 3 if config.strategy in ("dpo", "grpo", "distill") else 1.0
    return best * ref_cost * config.accumulation_steps
