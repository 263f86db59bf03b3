"""Scores of several models side by side: one table (rows: task, metric and language; columns:
models) and one JSON file with every number and the settings that produced it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from astrai_core import atomic_file

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
ALL = "all"  # the language of a score over every record


@dataclass(frozen=True)
class ScoreRow:
    task: str
    metric: str
    lang: str
    value: float
    stderr: float | None = None
    n: int | None = None  # records the score is over

    @property
    def key(self) -> tuple[str, str, str]:
        return self.task, self.metric, self.lang


@dataclass
class ModelResult:
    name: str
    path: str | None
    scores: list[ScoreRow] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # task -> wall time
    info: dict[str, Any] = field(default_factory=dict)  # parameters, dtype, device, ...
    raw: dict[str, Any] = field(default_factory=dict)  # task -> everything its kind reported

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "info": self.info, "seconds": self.seconds,
                "scores": [asdict(s) for s in self.scores], "raw": self.raw}


@dataclass
class EvalReport:
    models: list[ModelResult]
    settings: dict[str, Any]

    def row_keys(self) -> list[tuple[str, str, str]]:
        """Row keys in first-seen order (tasks in the order asked, languages as reported)."""
        seen: dict[tuple[str, str, str], None] = {}
        for model in self.models:
            for score in model.scores:
                seen.setdefault(score.key, None)
        return list(seen)

    def cell(self, model: ModelResult, key: tuple[str, str, str]) -> ScoreRow | None:
        return next((s for s in model.scores if s.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "models": [m.to_dict() for m in self.models]}

    def write(self, folder: Path) -> Path:
        """OUT/results.json and OUT/results.md, each written atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / TABLE_FILE) as tmp:
            tmp.write_text(markdown_table(self) + "\n", encoding="utf-8")
        with atomic_file(folder / RESULTS_FILE) as tmp:
            tmp.write_text(json.dumps(_clean(self.to_dict()), ensure_ascii=False, indent=2,
                                      default=str) + "\n", encoding="utf-8")
        return folder / RESULTS_FILE


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def format_value(score: ScoreRow | None) -> str:
    if score is None or score.value is None or not math.isfinite(score.value):
        return "-"
    text = f"{score.value:.4g}" if abs(score.value) >= 1000 else f"{score.value:.4f}"
    if score.stderr is not None and math.isfinite(score.stderr) and score.stderr > 0:
        text += f" ± {score.stderr:.4f}"
    return text


def results_table(report: EvalReport, title: str = "astrai eval") -> Table:
    table = Table(title=title)
    for header in ("task", "metric", "lang"):
        table.add_column(header)
    for model in report.models:
        table.add_column(model.name, justify="right")
    for key in report.row_keys():
        table.add_row(*key, *(format_value(report.cell(m, key)) for m in report.models))
    return table


def markdown_table(report: EvalReport) -> str:
    head = ["task", "metric", "lang", *(m.name for m in report.models)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in report.row_keys():
        cells = [*key, *(format_value(report.cell(m, key)) for m in report.models)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
