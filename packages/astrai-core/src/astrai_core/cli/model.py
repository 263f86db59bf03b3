"""`astrai model init|info`: create a randomly initialised model folder, describe a model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from astrai_core.atomic import atomic_file
from astrai_core.cli.aliases import aliased
from astrai_core.model.automodel import AutoModel, read_config
from astrai_core.model.moe import active_parameters
from astrai_core.model.presets import PRESETS, get_preset
from astrai_core.model.weights import count_stored_parameters, folder_size

model_app = typer.Typer(help="Create and inspect model folders.", no_args_is_help=True)
console = Console()

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


@model_app.command("init", cls=aliased({"--force": "--overwrite"}))
def init(
    preset: str = typer.Option(..., "--preset", help=f"Model shape: {', '.join(PRESETS)}."),
    out: Path = typer.Option(..., "--out", help="Folder to write (config.json + model.safetensors)."),
    seed: int = typer.Option(0, help="Random seed for the initial weights."),
    dtype: str = typer.Option("float32", help="Stored dtype: float32, bfloat16 or float16."),
    vocab_size: int = typer.Option(0, help="Override the preset's vocabulary size (0 keeps it)."),
    tokenizer: Path | None = typer.Option(None, help="Tokenizer folder to copy in, so the result is servable."),
    overwrite: bool = typer.Option(False, help="Overwrite an existing model folder."),
) -> None:
    """Write a randomly initialised model folder.

    Example: astrai model init --preset tiny --out runs/tiny
    """
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    config = get_preset(preset, **overrides)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.to(dtype={"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    model.save_pretrained(out)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                with atomic_file(out / name) as tmp:
                    shutil.copy2(tokenizer / name, tmp)
    total = model.num_parameters()
    active = active_parameters(config, total)
    active_text = f", {active:,} active per token" if active != total else ""
    console.print(f"wrote {out} ({preset}, {total:,} parameters{active_text}, {dtype})")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@model_app.command("info")
def info(path: Path = typer.Argument(..., help="A model folder (ours or Hugging Face llama/qwen2/qwen3/qwen3_moe/mixtral).")) -> None:
    """Show a model folder's config, parameter count, size on disk and dtype.

    Example: astrai model info runs/tiny
    """
    model_type, config, from_hf = read_config(path)
    # From the weight files' headers, which this checks: a cut-short file fails here, not later.
    parameters = count_stored_parameters(path, config.tie_weight)
    table = Table(title=str(path), show_header=False)
    source = config.extra.get("source_model_type", model_type)
    table.add_row("format", f"Hugging Face {source}" if from_hf else "astrai")
    table.add_row("parameters", f"{parameters:,}")
    if config.is_moe:
        table.add_row("active parameters", f"{active_parameters(config, parameters):,} per token")
    table.add_row("size on disk", _human_bytes(folder_size(path)))
    table.add_row("dtype", config.torch_dtype)
    for key, value in config.to_dict().items():
        if key not in ("extra", "torch_dtype", "model_type"):
            table.add_row(key, str(value))
    console.print(table)
