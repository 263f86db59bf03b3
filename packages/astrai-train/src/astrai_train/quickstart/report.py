"""What the quickstart prints: the stage times, the results table and the sample chats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from astrai_train.quickstart.evaluate import LANGS, StageMetrics


def _fmt(value: float | None, digits: int, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def results_table(rows: Sequence[StageMetrics]) -> Table:
    table = Table(title="held-out evaluation (greedy replies)")
    table.add_column("stage")
    for label in ("loss", "accuracy", "reward"):
        for lang in LANGS:
            table.add_column(f"{label} {lang}", justify="right")
    for m in rows:
        table.add_row(m.stage, *[_fmt(m.loss.get(lang), 3) for lang in LANGS],
                      *[_fmt(m.accuracy.get(lang), 1, percent=True) for lang in LANGS],
                      *[_fmt(m.reward.get(lang), 3) for lang in LANGS])
    return table


def markdown_table(rows: Sequence[StageMetrics]) -> str:
    """The same table in Markdown (README and docs/benchmarks.md quote it)."""
    head = ["stage"] + [f"{label} {lang}" for label in ("loss", "accuracy", "reward") for lang in LANGS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        cells = [m.stage, *[_fmt(m.loss.get(lang), 3) for lang in LANGS],
                 *[_fmt(m.accuracy.get(lang), 1, percent=True) for lang in LANGS],
                 *[_fmt(m.reward.get(lang), 3) for lang in LANGS]]
        lines.append("| " + " | ".join(cells) + " |")
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
