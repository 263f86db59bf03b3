"""`astrai model merge-lora BASE ADAPTER --out DIR`: fold a LoRA adapter (PEFT's format: ours,
a LoRA run's checkpoint, or one `peft` saved) into its base, giving a plain model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from astrai_core.cli.model import TOKENIZER_FILES, model_app

MERGE_HELP = """Merge a LoRA adapter into its base model: writes a model folder with W + (alpha / r) B A in every adapted layer, and the base's tokenizer.

ADAPTER is a folder with adapter_config.json and adapter_model.safetensors (PEFT's format): a checkpoint of `astrai train --lora-rank R`, or an adapter `peft` saved for a Llama/Qwen base.

The merge is computed in float32 and stored in the base's dtype (or --dtype).

Examples:

  astrai model merge-lora runs/pt/final runs/sft-lora/step_00000200 --out runs/sft-merged

  astrai model merge-lora Qwen3-0.6B/ my-peft-adapter/ --out runs/qwen3-merged --dtype bfloat16
"""

DTYPES = ("auto", "float32", "bfloat16", "float16")


def merge_lora_cmd(
    base: Path = typer.Argument(..., help="The base model folder the adapter was trained on.",
                                show_default=False),
    adapter: Path = typer.Argument(..., help="The adapter folder (adapter_config.json + "
                                   "adapter_model.safetensors).", show_default=False),
    out: Path = typer.Option(..., "--out", help="Model folder to write."),
    dtype: str = typer.Option("auto", help="Stored dtype: auto (the base's), float32, bfloat16 "
                              "or float16."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
) -> None:
    import torch

    from astrai_core.atomic import atomic_dir
    from astrai_core.model.adapter import LoRAAdapter
    from astrai_core.model.automodel import AutoModel, read_config
    from astrai_core.model.lora import merge_lora

    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    lora = LoRAAdapter.load(adapter)  # a bad adapter fails before the base is read
    _, config, _ = read_config(base)
    model = AutoModel.from_pretrained(base, dtype="float32")
    lora.apply_to(model)
    merge_lora(model)
    stored = config.torch_dtype if dtype == "auto" else dtype
    model.to(dtype={"float32": torch.float32, "bfloat16": torch.bfloat16,
                    "float16": torch.float16}[stored])
    with atomic_dir(out) as tmp:
        model.write_model_files(tmp)
        for name in TOKENIZER_FILES:  # the base's tokenizer, else the one saved with the adapter
            source = next((f / name for f in (base, adapter) if (f / name).is_file()), None)
            if source is not None:
                shutil.copy2(source, tmp / name)
    typer.echo(f"wrote {out} ({len(lora.layer_names)} layers merged, rank {lora.config.rank}, "
               f"{stored})")


def register() -> None:
    """Add `merge-lora` to `astrai model` (called from `cli.commands`; once)."""
    if not any(c.name == "merge-lora" for c in model_app.registered_commands):
        model_app.command("merge-lora", help=MERGE_HELP)(merge_lora_cmd)
