"""Typed configuration and result of a preprocessing run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from astrai_data.storage import H5WriteConfig


@dataclass(frozen=True)
class PrepareConfig:
    skip_invalid: bool = False
    """Skip malformed lines (and report how many) instead of stopping at the first one."""
    num_workers: int | None = None
    """Tokenizer processes; None uses every CPU, 0 encodes in the calling process."""
    chunk_lines: int = 512
    """Input lines per task sent to a worker."""
    max_in_flight: int | None = None
    """Chunks read ahead of the writer (bounds memory); None means 2 per worker + 2."""
    storage: H5WriteConfig = field(default_factory=H5WriteConfig)

    def __post_init__(self) -> None:
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.chunk_lines < 1:
            raise ValueError(f"chunk_lines must be >= 1, got {self.chunk_lines}")

    @property
    def workers(self) -> int:
        return (os.cpu_count() or 1) if self.num_workers is None else self.num_workers

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or 2 * max(self.workers, 1) + 2


@dataclass
class PrepareReport:
    out: Path
    kind: str
    records: int = 0
    tokens: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    """The first few skipped lines as FILE:LINE: reason."""
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0
