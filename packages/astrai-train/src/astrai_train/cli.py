"""`astrai train`: the sub-command astrai-train adds to the `astrai` CLI (entry-point group
`astrai.cli`). Every plain-value TrainConfig field gets a flag, generated from the dataclass, so
the flags, the TOML keys and the config can never drift apart."""

from __future__ import annotations

import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from astrai_core.cli.aliases import aliased
from astrai_train.config import TrainConfig
from astrai_train.launch import (
    LaunchOptions,
    RunEstimate,
    build_config,
    estimate_run,
    locate_checkpoint,
    merge_options,
    write_launch,
)
from astrai_train.parallel.launch import RunSummary, train_spawned
from astrai_train.parallel.setup import (
    DistributedWorkerError,
    cleanup_parallel,
    communication_error,
    get_rank,
    get_world_size,
    in_torchrun,
    is_communication_error,
    setup_from_env,
)
from astrai_train.resume import find_latest_checkpoint
from astrai_train.trainer import NonFiniteLossError, Trainer

console = Console()
err_console = Console(stderr=True)
# Exit status of a run stopped by SIGTERM or Ctrl-C after its checkpoint: sysexits' EX_TEMPFAIL
# ("try again later"), so a job scheduler can tell it from success (0) and failure (1) and requeue.
EXIT_STOPPED = 75

HELP = """Train a model with the seq, sft, dpo, grpo or distill strategy.

Examples:

  astrai train --strategy seq --data corpus.h5 --out runs/pt --preset small --tokenizer tok/

  astrai train --strategy sft --data chat.h5 --out runs/sft --model runs/pt/step_00001000

  astrai train --strategy sft --data chat.h5 --out runs/sft-lora --model runs/pt/final --lora-rank 8   (LoRA: checkpoints are PEFT adapters)

  astrai train --strategy distill --teacher runs/big/final --data corpus.h5 --out runs/kd --preset tiny --tokenizer tok/

  astrai train --strategy sft --data chat.h5 --out runs/sft --model runs/pt/final --batch-size 32 --fit-memory auto

  astrai train --out runs/pt --resume   (continue from the latest checkpoint, same options)

A run stopped by SIGTERM or Ctrl-C saves a checkpoint and exits with status 75, so a job scheduler can requeue it; `--resume` continues it. A corrupt newest checkpoint is moved aside (step_X.corrupt) and the newest intact one is resumed.

Options come from --config FILE.toml (keys are the option names with underscores) and the flags; flags win. With --resume, options not given again are those of the run resumed.
"""

RUN_PARAMS: list[tuple[str, Any, Any]] = [
    ("data", Path | None, typer.Option(None, "--data", help="Dataset file (.h5 or .json) of the strategy's kind.", rich_help_panel="Run")),
    ("model", Path | None, typer.Option(None, "--model", help="Model folder to start from.", rich_help_panel="Run")),
    ("preset", str | None, typer.Option(None, "--preset", help="Start from random weights of this shape (tiny, small, 1b...); needs --tokenizer.", rich_help_panel="Run")),
    ("max_seq_len", int | None, typer.Option(None, "--max-seq-len", help="Tokens per sample (seq/sft default: the model's max_seq_len; dpo/grpo: cap).", rich_help_panel="Run")),
    ("stride", int | None, typer.Option(None, "--stride", help="Tokens between window starts (seq/sft; default: window size).", rich_help_panel="Run")),
    ("config", Path | None, typer.Option(None, "--config", help="TOML file of options; flags win over it.", rich_help_panel="Run")),
    ("resume", bool, typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out.", rich_help_panel="Run")),
]


def _base_type(hint: Any) -> Any:
    """int | None -> int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def config_parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in TrainConfig.value_fields():
        name = f.name
        flag = "--" + name.replace("_", "-")
        base = _base_type(hints[f.name])
        if f.name == "extra_kwargs":
            base, help_text = list[str], f.metadata["help"] + " Repeatable; VALUE is JSON or text."
        else:
            help_text = f"{f.metadata['help']} " + escape(f"[default: {f.default}]")
        if base is bool:
            flag += f"/--no-{name.replace('_', '-')}"
        option = typer.Option(None, flag, help=help_text, rich_help_panel="Training (TrainConfig)")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=base | None))
    return params


def parse_extra(pairs: list[str] | None) -> dict[str, Any] | None:
    if pairs is None:
        return None
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--extra-kwargs expects KEY=VALUE, got {pair!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return extra


def start_table(config: TrainConfig, estimate: RunEstimate) -> Table:
    table = Table(title=f"astrai train: {config.strategy}", show_header=False)
    table.add_row("parameters", f"{estimate.parameters:,}")
    table.add_row("tokens per optimizer step", f"{estimate.tokens_per_step:,}")
    steps = f"{estimate.total_steps:,}"
    if estimate.done_steps:
        steps += f" (resuming after {estimate.done_steps:,})"
    table.add_row("steps", steps)
    table.add_row("estimated time", _duration(estimate.seconds))
    table.add_row("samples per step",
                  f"{config.batch_size} x {config.accumulation_steps} accumulation"
                  + (f" (--fit-memory {config.fit_memory} chooses the split)"
                     if config.fit_memory else ""))
    if config.lora_rank is not None:
        alpha = config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_rank
        table.add_row("LoRA", f"rank {config.lora_rank}, alpha {alpha:g} on {config.lora_targets}")
    if config.nprocs > 1 or get_world_size() > 1:
        world = max(config.nprocs, get_world_size())
        table.add_row("processes", f"{world} ({config.parallel}; batch and tokens are per process)")
    table.add_row("output", config.out)
    return table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"~{hours}h {minutes:02d}m" if hours else f"~{minutes}m {secs:02d}s"


def train_command(**options: Any) -> None:
    config_file, resume = options.pop("config"), options.pop("resume")
    options["extra_kwargs"] = parse_extra(options.get("extra_kwargs"))
    opts: LaunchOptions = merge_options(options, config_file, resume)
    torchrun = in_torchrun()  # torchrun started this process: join its process group
    if torchrun:
        values = TrainConfig.from_dict(opts.values)
        setup_from_env(values.backend, values.device, values.dist_timeout_s)
    main = get_rank() == 0  # now: the process group is gone after cleanup_parallel
    try:
        summary = _train(opts, torchrun)
    except (NonFiniteLossError, DistributedWorkerError) as exc:
        if isinstance(exc, DistributedWorkerError) and exc.details:
            err_console.print(exc.details.rstrip(), style="dim", highlight=False, markup=False)
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        if not (torchrun and is_communication_error(exc)):
            raise
        err = communication_error(exc, TrainConfig.from_dict(opts.values).dist_timeout_s)
        err_console.print(f"[red]error:[/] rank {get_rank()}: {escape(str(err))}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        if torchrun:
            cleanup_parallel()
    if summary is None:
        return
    where = summary.last_checkpoint or "no checkpoint"
    if summary.stop_requested:
        if main:
            console.print(f"stopped by {summary.stop_requested} after step {summary.iteration}; "
                          f"saved {where}. Continue with: astrai train --out {opts.out} --resume")
        # Not 0 (a scheduler must not take it for a finished run) nor 1 (it did not fail).
        raise typer.Exit(EXIT_STOPPED)
    if main:
        console.print(f"done: {summary.iteration} steps, final loss {summary.loss:.4f}; saved {where}")


def _train(opts: LaunchOptions, torchrun: bool) -> RunSummary | None:
    """Train in this process, or in `--nprocs` spawned ones; -> this process's summary (rank 0's
    for spawned runs)."""
    notes: list[str] = []
    checkpoint = locate_checkpoint(opts, notes)
    config = build_config(opts)
    main = get_rank() == 0
    if main:
        for note in notes:
            err_console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
        write_launch(opts, config)
        console.print(start_table(config, estimate_run(config, checkpoint)))
    if config.nprocs > 1 and not torchrun:
        where = find_latest_checkpoint(opts.out) if checkpoint is not None else None
        values = config.replace(model=None, dataset=None)  # the workers build their own
        del config
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the estimate's model leaves GPU 0 to the workers
        return train_spawned(opts, values, where)
    return RunSummary.of(Trainer(config).train(checkpoint))


def _command() -> Any:
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
              for n, a, d in RUN_PARAMS] + config_parameters()

    def train(**options: Any) -> None:
        train_command(**options)

    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in params}
    train.__doc__ = HELP
    return train


# Flags of the previous release (hidden; they print a deprecation line).
DEPRECATED_FLAGS = {
    "--random-seed": "--seed", "--progress-bar": "--progress", "--no-progress-bar": "--no-progress",
    "--device-type": "--device", "--precision": "--dtype", "--window-size": "--max-seq-len",
    "--grpo-max-new-tokens": "--rollout-max-tokens", "--grpo-temperature": "--rollout-temperature",
    "--grpo-top-p": "--rollout-top-p",
}


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP, no_args_is_help=True, cls=aliased(DEPRECATED_FLAGS))(_command())
