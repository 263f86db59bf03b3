"""`astrai quickstart`: the whole life cycle of a bilingual chat model on the embedded corpus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console

from astrai_train.cli import EXIT_STOPPED
from astrai_train.quickstart.config import QuickstartConfig

HELP = """Train a bilingual (English and Chinese) chat model end to end on a CPU, in about five
minutes on two cores: synthetic corpus, tokenizer, pretraining of the `mini` preset, SFT, DPO,
online GRPO on verifiable arithmetic, a held-out evaluation table, sample chats, and a servable
model folder OUT/final.

Examples:

  astrai quickstart

  astrai quickstart --steps-scale 4 --out runs/longer      (a longer, better run)

  astrai quickstart --serve                                 (then serve the result)

Running the same command again continues an interrupted run; the same --seed gives the same table.
"""


def quickstart_cmd(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Folder of every stage's output."),
    steps_scale: float = typer.Option(1.0, "--steps-scale", help="Multiply every stage's steps (0.05: smoke test; 4: longer run)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the corpus, the initial weights, sampling and data order."),
    preset: str = typer.Option("mini", "--preset", help="Model shape (mini, small, tiny, ...); the vocabulary follows the tokenizer."),
    corpus_size: int = typer.Option(2000, "--corpus-size", help="SFT chats in the synthetic corpus (other files scale with it)."),
    eval_limit: int | None = typer.Option(None, "--eval-limit", help="Held-out records per evaluation file (default: all)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete OUT and start again."),
    serve: bool = typer.Option(False, "--serve", help="Serve OUT/final (OpenAI-compatible API) when done."),
    port: int = typer.Option(8000, "--port", help="Port for --serve."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    from astrai_train.quickstart.pipeline import run_quickstart

    console = Console()
    cfg = QuickstartConfig(out=out, seed=seed, steps_scale=steps_scale, preset=preset,
                           corpus_size=corpus_size, eval_limit=eval_limit, serve=serve, port=port,
                           progress=progress)
    try:
        result = run_quickstart(cfg, console, overwrite=overwrite)
    except KeyboardInterrupt:
        # The stage in progress saved a checkpoint on the way out (the trainer's signal handler).
        console.print(f"\ninterrupted; run the same command again to continue where it stopped "
                      f"(finished stages in {out} are kept)")
        raise typer.Exit(EXIT_STOPPED) from None
    command = f"astrai serve {result.final}"
    console.print(f"\n[bold green]done.[/] Serve the model with:\n\n    {command}\n\n"
                  f"or chat in the terminal: astrai chat {result.final}")
    if serve:
        console.print(f"starting: {command} --port {port}")
        # The server runs as its own process: nothing of training stays in its memory.
        argv = [sys.executable, "-m", "astrai_core.cli.main", "serve", str(result.final),
                "--port", str(port)]
        raise typer.Exit(subprocess.call(argv))


def register(app: typer.Typer) -> None:
    app.command("quickstart", help=HELP)(quickstart_cmd)
