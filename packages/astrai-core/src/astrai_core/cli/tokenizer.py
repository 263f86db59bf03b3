"""`astrai tokenizer train|encode`: train a bilingual byte-level BPE, inspect how text tokenizes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from astrai_core.cli.aliases import aliased
from astrai_core.tokenizer import AutoTokenizer, train_tokenizer
from astrai_core.tokenizer.streaming import REPLACEMENT_CHAR
from astrai_core.tokenizer.training import TrainingReport

tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
console = Console()


@tokenizer_app.command("train", cls=aliased({"--force": "--overwrite"}))
def train(
    more_inputs: list[Path] | None = typer.Argument(
        None, metavar="FILE", show_default=False,
        help="More input files; lets `--input a.txt b.txt` name several at once."),
    inputs: list[Path] = typer.Option(
        [], "--input", "-i", show_default=False,
        help="Training text: plain text (one text per line) or .jsonl ('text' or 'messages')."),
    vocab_size: int = typer.Option(8000, "--vocab-size", help="Tokens in the vocabulary, special tokens included."),
    out: Path = typer.Option(..., "--out", help="Tokenizer folder to write (Hugging Face layout)."),
    min_frequency: int = typer.Option(2, help="Merge only pairs seen at least this often."),
    held_out_every: int = typer.Option(50, help="Keep every Nth text out of training to measure compression."),
    overwrite: bool = typer.Option(False, help="Replace a tokenizer already in --out."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a byte-level BPE for English and Chinese, streaming the input files.

    Digits become single tokens and Chinese is never glued to Latin words. Prints characters per token for each language on held-out text.

    Examples:

      astrai tokenizer train --input corpus.txt --vocab-size 8000 --out runs/tokenizer

      astrai tokenizer train --input en.txt zh.jsonl --vocab-size 4000 --out tok --overwrite
    """
    files = [*inputs, *(more_inputs or [])]
    report = train_tokenizer(files, vocab_size, out, min_frequency=min_frequency,
                             held_out_every=held_out_every, show_progress=progress, overwrite=overwrite)
    console.print(_report_table(report))
    if report.vocab_size < report.requested_vocab_size:
        console.print(f"[yellow]warning:[/] the corpus allowed only {report.vocab_size} tokens of the "
                      f"{report.requested_vocab_size} asked for; give more text or a smaller --vocab-size")


def _report_table(report: TrainingReport) -> Table:
    table = Table(title=f"tokenizer written to {report.out_dir}", show_header=False)
    table.add_row("vocabulary size", f"{report.vocab_size:,}")
    table.add_row("training texts", f"{report.train_texts:,} ({report.train_bytes / 1e6:.1f} MB)")
    table.add_row("held-out texts", f"{report.held_out_texts:,}")
    for language, chars_per_token in report.compression.items():
        table.add_row(f"{language} characters/token", f"{chars_per_token:.2f}")
    table.add_row("time", f"{report.seconds:.1f} s")
    return table


@tokenizer_app.command("encode")
def encode(
    path: Path = typer.Argument(..., help="A tokenizer folder, or a model folder holding one."),
    text: str = typer.Argument(..., help="The text to tokenize."),
    add_special_tokens: bool = typer.Option(False, help="Let the tokenizer add its markers (ours: bos)."),
    chat: bool = typer.Option(False, help="Render TEXT as a user message with the chat template first."),
) -> None:
    """Show the tokens and ids of a text.

    Examples:

      astrai tokenizer encode runs/tokenizer "我有 12 个 apples"

      astrai tokenizer encode runs/tiny "Hello" --chat
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat:
        text = str(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False))
        console.print("rendered chat:", repr(text), highlight=False)
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    table = Table("#", "id", "token", "text")
    for index, token_id in enumerate(ids):
        piece = tokenizer.decode([token_id], skip_special_tokens=False)
        shown = "(part of a character)" if REPLACEMENT_CHAR in piece else repr(piece)
        table.add_row(str(index), str(token_id), tokenizer.id_to_token(token_id) or "?", shown)
    console.print(table)
    ratio = len(text) / len(ids) if ids else 0.0
    console.print(f"{len(ids)} tokens, {len(text)} characters, {ratio:.2f} characters/token")
