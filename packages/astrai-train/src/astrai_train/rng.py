"""Seeding and capturing/restoring every random number generator a run touches.

States are stored in checkpoints as tensors and plain tuples (no pickle): torch CPU and CUDA
generator states are uint8 tensors, Python's `random` state is a tuple of ints, and numpy's
MT19937 key is kept as an int64 tensor.
"""

from __future__ import annotations

import random
import signal
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def capture_rng_state() -> dict[str, Any]:
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples all the way down."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive the worker's Python/numpy seeds from its torch seed
    (itself derived from the loader's per-epoch generator), and leave Ctrl-C/SIGTERM to the
    main process, which finishes its optimizer step and checkpoints before the workers stop."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
