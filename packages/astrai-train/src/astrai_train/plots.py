"""Learning curves as PNG files, from the metric logs (`metrics.jsonl`). matplotlib is optional
(`pip install 'astrai-train[plot]'`): without it nothing is drawn and callers say how to get it.
Only the object API is used (no pyplot): no global backend or figure state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOT_HINT = "install matplotlib to draw it: pip install 'astrai-train[plot]'"
# Strategy metrics drawn beside the loss when a stage logs them (online RL's mean reward).
SECOND_AXIS = ("reward_mean", "reward_margin")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_loss_curve(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """One run's loss against its optimizer steps; False when matplotlib is not installed."""
    return plot_stage_curves({"": list(records)}, path)


def plot_stage_curves(stages: Mapping[str, Sequence[dict[str, Any]]], path: Path,
                      title: str | None = None) -> bool:
    """One panel per stage (in order): its loss per step, and on a second axis the reward or
    margin it logs; False when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    stages = {name: [r for r in records if "loss" in r] for name, records in stages.items()}
    stages = {name: records for name, records in stages.items() if records}
    if not stages:
        return False
    fig = Figure(figsize=(4.2 * len(stages), 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, (name, records) in zip(axes, stages.items(), strict=True):
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], color="tab:blue", linewidth=1.4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss", color="tab:blue")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        extra = next((key for key in SECOND_AXIS if all(key in r for r in records)), None)
        if extra is not None:
            twin = ax.twinx()
            twin.plot(steps, [r[extra] for r in records], color="tab:orange", linewidth=1.4)
            twin.set_ylabel(extra.replace("_", " "), color="tab:orange")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True
