"""`astrai data prepare|synth|inspect`, added to the `astrai` CLI through the entry-point group
`astrai.cli`."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from astrai_core.cli.aliases import aliased

data_app = typer.Typer(help="Prepare, inspect and synthesize training data.",
                       no_args_is_help=True)
console = Console()


class Strategy(StrEnum):
    seq = "seq"
    sft = "sft"
    dpo = "dpo"
    grpo = "grpo"


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so cleanup (removing a partial output) runs as on Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@data_app.command("prepare", cls=aliased({"--kind": "--strategy", "--workers": "--num-workers"}))
def prepare_cmd(
    strategy: Strategy = typer.Option(..., "--strategy", help="Training strategy the data is for."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer (or model) folder."),
    inputs: list[Path] = typer.Option(..., "--input", "-i",
                                      help="JSONL input file; several may follow the option."),
    more_inputs: list[Path] | None = typer.Argument(None, help="More JSONL input files.",
                                                    show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (.h5; .json/.jsonl for tiny data)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid",
                                      help="Skip malformed lines and report how many."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Tokenizer processes (default: all CPUs)."),
    compression: str | None = typer.Option(None, "--compression", help="gzip or lzf (default: none)."),
) -> None:
    """Tokenize JSONL into a dataset file. Input formats are in the astrai-data README.

    Example: astrai data prepare --strategy sft --tokenizer tok/ --input sft.jsonl --out sft.h5
    """
    from astrai_data.prepare import PrepareConfig, prepare
    from astrai_data.storage import H5WriteConfig

    config = PrepareConfig(skip_invalid=skip_invalid, num_workers=num_workers,
                           storage=H5WriteConfig(compression=compression))
    with _exit_on_sigterm():
        report = prepare(strategy.value, [*inputs, *(more_inputs or [])], out, tokenizer, config,
                         progress=True)
    console.print(f"wrote {report.out}: {report.kind}, {report.records:,} records, "
                  f"{report.tokens:,} tokens in {report.seconds:.1f} s "
                  f"({report.tokens_per_s:,.0f} tokens/s)", highlight=False, soft_wrap=True)
    if report.skipped:
        console.print(f"skipped {report.skipped:,} invalid lines; first:", highlight=False)
        for line in report.skipped_examples:
            console.print(Text(f"  {line}"), soft_wrap=True)


@data_app.command("synth", cls=aliased({"--size": "--corpus-size"}))
def synth_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the corpus files into."),
    corpus_size: int | None = typer.Option(None, "--corpus-size", help="SFT chats; other files scale with it."),
    seed: int = typer.Option(0, "--seed", help="Same seed and size, same files."),
) -> None:
    """Write the synthetic English/Chinese corpus for every stage, with held-out eval files.

    Example: astrai data synth --out data/ --corpus-size 2000 --seed 0
    """
    from astrai_data.synth import DEFAULT_SIZE, synthesize

    report = synthesize(out, size=corpus_size or DEFAULT_SIZE, seed=seed)
    table = Table(title=f"{out} (seed {seed}, size {report.size})")
    table.add_column("file")
    table.add_column("records", justify="right")
    table.add_column("size", justify="right")
    for name, count in report.records.items():
        table.add_row(name, f"{count:,}", f"{report.bytes[name] / 1024:,.0f} KiB")
    console.print(table)


@data_app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="A prepared dataset file."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer",
                                          help="Decode with this tokenizer (default: the one "
                                               "recorded at preparation, if still there)."),
) -> None:
    """Show a dataset file's strategy, keys, record and token counts and one decoded example.

    Example: astrai data inspect sft.h5
    """
    from astrai_data.prepare.inspect import inspect_dataset

    summary = inspect_dataset(path, tokenizer)
    table = Table(title=str(path), show_header=False)
    table.add_row("strategy", summary.kind)
    table.add_row("format version", str(summary.format_version))
    table.add_row("tokenizer", summary.tokenizer_fingerprint[:16] or "unknown")
    table.add_row("keys", ", ".join(summary.keys))
    table.add_row("records", "unknown" if summary.records is None else f"{summary.records:,}")
    for key, count in summary.tokens.items():
        table.add_row(f"tokens: {key}", f"{count:,} in {summary.segments[key]} segment(s)")
    for name in ("grpo_mode", "group_size", "pad_id", "vocab_size", "skipped", "sources"):
        if name in summary.info:
            table.add_row(name, str(summary.info[name]))
    console.print(table)
    if any("mask" in key for key in summary.keys):
        console.print("[[ ]] marks the tokens the loss counts", highlight=False, markup=False)
    if not summary.decoded:
        console.print("(token ids shown: pass --tokenizer DIR to decode)", highlight=False)
    for title, text in summary.example:
        console.print(Text(f"-- {title} --", style="bold"))
        console.print(Text(text), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
