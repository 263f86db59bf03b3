"""Hidden, deprecated spellings of command-line flags.

A flag renamed in this release keeps working for one more: `aliased(old=new)` gives a command
class that rewrites the old spelling to the new one before parsing and prints one deprecation
line. The old spelling never shows in `--help`, so every concept has one visible name (checked
by tests/test_cli_vocabulary.py).

    app.command("prepare", cls=aliased({"--kind": "--strategy"}))(prepare_cmd)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import typer
from typer.core import TyperCommand

from astrai_core.deprecation import REMOVAL


def rewrite_flags(args: list[str], renamed: Mapping[str, str], warn: Any = None) -> list[str]:
    """`args` with each old flag (`--old`, `--old=value`) replaced by its new spelling; stops at
    `--` (what follows is not an option)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, sep, value = arg.partition("=")
        if name in renamed:
            if warn is not None:
                warn(name, renamed[name])
            arg = renamed[name] + sep + value
        out.append(arg)
    return out


def _warn(old: str, new: str) -> None:
    typer.echo(f"warning: {old} is deprecated and will be removed in {REMOVAL}; use {new}",
               err=True)


def aliased(renamed: Mapping[str, str]) -> type[TyperCommand]:
    """A Typer command class that accepts the `renamed` old flags (old -> new)."""
    table = dict(renamed)

    class AliasedCommand(TyperCommand):
        deprecated_flags = table

        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            return super().parse_args(ctx, rewrite_flags(args, table, _warn))

    return AliasedCommand
