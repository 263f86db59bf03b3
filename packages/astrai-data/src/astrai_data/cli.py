"""Sub-commands that astrai-data adds to the `astrai` CLI (entry-point group `astrai.cli`)."""

import typer


def register(app: typer.Typer) -> None:
    """Nothing yet: commands arrive with later issues."""
