"""Sub-commands core adds to `astrai`: `model init|info` and `tokenizer train|encode`."""

from __future__ import annotations

import typer

from astrai_core.cli.model import model_app
from astrai_core.cli.tokenizer import tokenizer_app


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
    app.add_typer(tokenizer_app, name="tokenizer")
