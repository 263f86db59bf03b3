"""The `astrai` command line: a Typer app owned by core; every installed package adds its
sub-commands through the entry-point group `astrai.cli` (a function `register(app)`)."""

from __future__ import annotations

import os
import sys
from importlib.metadata import distributions, entry_points

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="astrai",
    help="AstrAI: train and serve small bilingual language models, from a laptop CPU to a GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

# Errors a user can cause and fix: printed as one line, not a traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, ImportError, OSError)


def installed_versions() -> dict[str, str]:
    found = {}
    for dist in distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().startswith("astrai-"):
            found[name.lower()] = dist.version
    return dict(sorted(found.items()))


def _version_callback(value: bool) -> None:
    if value:
        for name, version in installed_versions().items():
            typer.echo(f"{name} {version}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True,
        help="Show the versions of all installed AstrAI packages and exit.",
    ),
) -> None:
    """AstrAI command line. `astrai COMMAND --help` shows each command with examples."""


def load_plugins(target: typer.Typer) -> None:
    for ep in sorted(entry_points(group="astrai.cli"), key=lambda e: e.name):
        try:
            ep.load()(target)
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            err_console.print(f"[yellow]warning:[/] could not load astrai.cli plugin '{ep.name}': {exc}")


load_plugins(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except USER_ERRORS as exc:
        if os.environ.get("ASTRAI_DEBUG"):
            raise
        # escape: a message may hold brackets (pip install 'pkg[extra]') that are not markup
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
