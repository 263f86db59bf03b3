"""What the quickstart prints: the stage times, the results table and the sample chats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from astrai_train.evaluation import LANGS, HeldOutScores

# (header, HeldOutScores attribute, digits, percent)
COLUMNS = (("loss", "loss", 3, False), ("accuracy", "accuracy", 1, True),
           ("pref. acc.", "preference", 1, True), ("margin", "margin", 2, False),
           ("reward", "reward", 3, False))


def _fmt(value: float | None, digits: int, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.{digits}f}%" if percent else f"{value:.{digits}f}"


def _cells(row: HeldOutScores) -> list[str]:
    return [_fmt(getattr(row, attr).get(lang), digits, percent)
            for _, attr, digits, percent in COLUMNS for lang in LANGS]


def _headers() -> list[str]:
    return [f"{label} {lang}" for label, *_ in COLUMNS for lang in LANGS]


def results_table(rows: Sequence[HeldOutScores]) -> Table:
    table = Table(title="held-out evaluation (greedy replies)")
    table.add_column("stage")
    for header in _headers():
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(row.stage, *_cells(row))
    return table


def markdown_table(rows: Sequence[HeldOutScores]) -> str:
    """The same table in Markdown (README and docs/benchmarks.md quote it)."""
    head = ["stage", *_headers()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([row.stage, *_cells(row)]) + " |" for row in rows]
    return "\n".join(lines)


def times_table(seconds: dict[str, float]) -> Table:
    table = Table(title="wall time per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, value in seconds.items():
        table.add_row(name, f"{value:.1f}")
    table.add_row("total", f"{sum(seconds.values()):.1f}", style="bold")
    return table


def samples_table(samples: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="sample chats (held-out questions, greedy)", show_lines=True)
    for column in ("lang", "user", "model", "reference"):
        table.add_column(column)
    for s in samples:
        table.add_row(s["lang"], s["user"], s["model"], s["reference"])
    return table
