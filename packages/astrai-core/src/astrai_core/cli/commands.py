"""Sub-commands core adds to `astrai`: `model init|info|export|merge-lora` and
`tokenizer train|encode`."""

from __future__ import annotations

import typer

from astrai_core.cli import export, lora
from astrai_core.cli.model import model_app
from astrai_core.cli.tokenizer import tokenizer_app


def register(app: typer.Typer) -> None:
    export.register()
    lora.register()
    app.add_typer(model_app, name="model")
    app.add_typer(tokenizer_app, name="tokenizer")
