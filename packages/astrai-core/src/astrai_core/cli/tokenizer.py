"""`astrai tokenizer train|encode` (arrives with the tokenizer issue)."""

from __future__ import annotations

import typer

tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
