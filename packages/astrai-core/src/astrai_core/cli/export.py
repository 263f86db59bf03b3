"""`astrai model export`: write a model folder as a Hugging Face folder or a GGUF file, so it runs
in transformers and vLLM, or in llama.cpp and Ollama."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.console import Console

from astrai_core.cli.model import model_app

err_console = Console(stderr=True)

EXPORT_HELP = """Export a model folder to another runtime's format.

--format hf writes a Hugging Face folder (llama, qwen2 or qwen3, whichever holds the model exactly) with the tokenizer, its chat template and generation_config.json: transformers and vLLM load it as it is.

--format gguf writes one GGUF file for llama.cpp and Ollama (F32 by default; --dtype float16 or bfloat16, or --quantize q8_0) with the tokenizer and chat template; needs `pip install 'astrai-core\\[gguf]'`.

A model with a feature the format cannot hold (multi-head latent attention, gated attention) is refused before anything is written.

Examples:

  astrai model export runs/quickstart/final --format hf --out runs/export/hf

  astrai model export runs/quickstart/final --format gguf --out runs/export/model-f32.gguf

  astrai model export runs/quickstart/final --format gguf --quantize q8_0 --out runs/export/model-q8_0.gguf
"""

GGUF_DTYPES = {"auto": "f32", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def export_cmd(
    model_dir: Path = typer.Argument(..., help="Model folder with its tokenizer (ours, a "
                                     "checkpoint, or Hugging Face llama/qwen2/qwen3).",
                                     show_default=False),
    fmt: str = typer.Option(..., "--format", help="hf or gguf."),
    out: Path = typer.Option(..., "--out", help="Folder to write (hf) or file to write (gguf)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16. auto keeps the "
                              "stored dtype for hf and writes F32 for gguf."),
    quantize: str | None = typer.Option(None, help="gguf only: q8_0 (8-bit blocks of 32, "
                                        "llama.cpp's Q8_0)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
) -> None:
    from astrai_core.export import FORMATS, export_gguf, export_hf, load_source

    if fmt not in FORMATS:
        raise ValueError(f"unknown --format '{fmt}'; choose hf or gguf")
    file_type = _gguf_file_type(fmt, dtype, quantize)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    source = load_source(model_dir)
    if fmt == "hf":
        if dtype != "auto":
            source = _cast(source, dtype)
        family = export_hf(source, out)
        typer.echo(f"wrote {out} (Hugging Face {family}, {str(source.dtype).removeprefix('torch.')})")
        return
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        arch = export_gguf(source, out, file_type)
    for note in notes:
        err_console.print(f"[yellow]note:[/] {note.message}", highlight=False)
    typer.echo(f"wrote {out} (GGUF {arch}, {file_type.upper()})")


def _gguf_file_type(fmt: str, dtype: str, quantize: str | None) -> str:
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown --dtype '{dtype}'; choose auto, float32, bfloat16 or float16")
    if quantize is not None:
        if fmt != "gguf":
            raise ValueError("--quantize applies to --format gguf only; a Hugging Face folder "
                             "holds float weights (choose them with --dtype)")
        if quantize != "q8_0":
            raise ValueError(f"unknown --quantize '{quantize}'; the GGUF export writes q8_0")
        if dtype != "auto":
            raise ValueError("give --dtype or --quantize, not both")
        return "q8_0"
    return GGUF_DTYPES[dtype]


def _cast(source, dtype: str):
    import dataclasses

    import torch

    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    state = {k: v.to(target) for k, v in source.state.items()}
    return dataclasses.replace(source, state=state)


def register() -> None:
    """Add `export` to `astrai model` (called from `cli.commands`; once)."""
    if not any(c.name == "export" for c in model_app.registered_commands):
        model_app.command("export", help=EXPORT_HELP)(export_cmd)
