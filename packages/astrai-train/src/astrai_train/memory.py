"""Fitting a run to the memory it has (`--fit-memory SIZE|auto`).

Before training, one step's peak memory is measured on this model, strategy and sequence length
at micro-batches of 1 and 2 samples (the longest sample of the data, repeated), which gives the
fixed part and the part per sample. The run then takes the largest micro-batch that divides the
requested global batch (batch_size x accumulation_steps) and whose predicted peak stays below
the budget less a margin, with the accumulation that keeps the global batch; a prediction above
2 samples is confirmed by measuring that micro-batch itself. Activation checkpointing is turned
on only when not even one sample fits without it.

What is measured, and how:
- CUDA: `torch.cuda.max_memory_allocated` above the allocated memory before the step (the
  caching allocator's reserve is not counted: it is reused, not lost).
- CPU: the peak resident set size of this process above the one before the step: glibc is asked
  to return freed memory first (`malloc_trim`), the kernel's high-water mark is reset
  (`echo 5 > /proc/self/clear_refs`), the step runs, and `VmHWM` minus `VmRSS` before it is the
  step's own peak (Linux only).
The step's peak includes the gradients; the optimizer's state does not exist before the first
update, so it is added from the parameter sizes (AdamW: two tensors per trained parameter,
Muon: one).
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MARGIN = 0.10  # of the budget, left free for what a measurement cannot see (fragmentation, I/O)
PROBE_CANDIDATES = 512  # the longest of this many samples is the one every probe uses
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)
EXPONENT = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """'6GiB', '6G' (binary, as `free -g` and docker's `-m`), '6GB' (decimal), '800MiB', or a
    number of bytes -> bytes."""
    match = SIZE.match(str(text))
    if not match:
        raise ValueError(f"TrainConfig.fit_memory must be a size such as 6GiB, 800MiB, 12G or "
                         f"auto, got {text!r}")
    number, prefix, binary, unit = match.groups()
    decimal = unit.upper() == "B" and not binary and prefix  # "GB": powers of 1000
    return int(float(number) * (1000 if decimal else 1024) ** EXPONENT[prefix.upper()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- measuring ----------------------------------------------------------------------------------

def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _trim_heap() -> None:
    gc.collect()
    # Not glibc: freed memory may stay counted in the resident size, which errs high (safe).
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_peak_bytes(fn: Callable[[], None]) -> tuple[int, int]:
    """(resident bytes before, peak resident bytes above that while `fn` ran)."""
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _proc_status_bytes("VmRSS")
    except (OSError, KeyError):
        raise ValueError("--fit-memory on CPU reads the peak resident size from Linux's "
                         "/proc/self/status, which this system lacks; set --batch-size and "
                         "--accumulation-steps yourself") from None
    fn()
    return before, max(_proc_status_bytes("VmHWM") - before, 0)


def cuda_peak_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """(allocated bytes before, peak allocated bytes above that while `fn` ran)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return before, torch.cuda.max_memory_allocated(device) - before


def step_peak_bytes(fn: Callable[[], None], device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device)
    return cpu_peak_bytes(fn)


def available_bytes(device: torch.device) -> int:
    """`auto`: what this process may use: what it holds plus what the device has free (on
    CPU, MemAvailable, and the cgroup limit where one is set)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    meminfo = Path("/proc/meminfo").read_text()
    free = int(re.search(r"MemAvailable:\s+(\d+)", meminfo).group(1)) * 1024
    limit = Path("/sys/fs/cgroup/memory.max")
    current = Path("/sys/fs/cgroup/memory.current")
    if limit.is_file() and current.is_file() and limit.read_text().strip().isdigit():
        free = min(free, int(limit.read_text()) - int(current.read_text()))
    return free + _proc_status_bytes("VmRSS")


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """The optimizer's state once it exists (after the first update): AdamW keeps two tensors
    per trained parameter; Muon one for the block matrices and AdamW's two for the rest."""
    from astrai_train.optim import is_hidden_matrix

    total = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            copies = 1 if optimizer == "muon" and is_hidden_matrix(name, p) else 2
            total += copies * p.numel() * p.element_size()
    return total


# -- choosing ----------------------------------------------------------------------------------

@dataclass
class MemoryFit:
    budget: int
    micro_batch: int
    accumulation: int
    activation_checkpointing: bool
    predicted: int  # peak bytes of a step of the chosen micro-batch, everything included
    measured: dict[tuple[int, bool], int]  # (micro-batch, checkpointing) -> total peak bytes

    def describe(self) -> str:
        probes = ", ".join(f"{m} sample{'s' * (m > 1)}{' (ckpt)' if c else ''}: {human(b)}"
                           for (m, c), b in sorted(self.measured.items()))
        return (f"fit-memory: budget {human(self.budget)} ({MARGIN:.0%} kept free); measured "
                f"{probes}; chose micro-batch {self.micro_batch} x {self.accumulation} "
                f"accumulation, activation checkpointing "
                f"{'on' if self.activation_checkpointing else 'off'}, predicted peak "
                f"{human(self.predicted)}")


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_micro_batch(measure: Callable[[int, bool], int], global_batch: int, budget: int,
                       checkpointing_forced: bool = False, can_checkpoint: bool = True
                       ) -> MemoryFit:
    """`measure(micro_batch, checkpointing)` -> the total peak bytes of one such step.
    The largest divisor of `global_batch` predicted (then measured) below the budget less the
    margin wins; checkpointing is tried only when one sample does not fit without it."""
    limit = budget * (1 - MARGIN)
    measured: dict[tuple[int, bool], int] = {}

    def probe(m: int, ckpt: bool) -> int:
        if (m, ckpt) not in measured:
            measured[(m, ckpt)] = measure(m, ckpt)
        return measured[(m, ckpt)]

    modes = [True] if checkpointing_forced else [False, True] if can_checkpoint else [False]
    for ckpt in modes:
        one = probe(1, ckpt)
        if one > limit:
            continue
        # A line through the two probes: fixed bytes plus bytes per sample.
        per_sample = max(probe(2, ckpt) - one, 0) if global_batch >= 2 else one
        for m in divisors_descending(global_batch):
            predicted = one + per_sample * (m - 1)
            if predicted > limit:
                continue
            if m > 2:
                predicted = probe(m, ckpt)  # confirm: the run must not run out of memory
                if predicted > limit:
                    continue
            return MemoryFit(budget, m, global_batch // m, ckpt, predicted, measured)
    need = min(measured.values())
    raise ValueError(f"--fit-memory: one sample of this model and sequence length needs "
                     f"{human(need)} at its peak"
                     f"{' even with activation checkpointing' * (True in modes)}, more than "
                     f"the {human(limit)} usable of {human(budget)}; lower --max-seq-len, train "
                     f"LoRA adapters (--lora-rank), use a smaller model or a larger budget")


def _grows_with(item: dict) -> int:
    return sum(v.numel() for k, v in item.items()
               if k.endswith("input_ids") and isinstance(v, torch.Tensor))


def longest_item(dataset: object) -> dict:
    """The sample with the most tokens among the first PROBE_CANDIDATES (every probe uses it,
    repeated, so a measured batch is the widest batch of that many samples)."""
    n = min(len(dataset), PROBE_CANDIDATES)  # type: ignore[arg-type]
    items = [dataset[i] for i in range(n)]  # type: ignore[index]
    return max(items, key=_grows_with)


def fit_memory(cfg: object, strategy: object, model: nn.Module, collate: Callable,
               device: torch.device, autocast: Callable) -> MemoryFit:
    """Measure steps of `strategy` on `model` and choose the micro-batch (module docstring).
    The run is left as it was: RNG states forked, gradients cleared, checkpointing restored."""
    budget = available_bytes(device) if cfg.fit_memory == "auto" else parse_size(cfg.fit_memory)
    item = longest_item(cfg.dataset)
    if "prompt_ids" in item:
        raise ValueError("--fit-memory measures training steps on the data, but online rollouts "
                         "generate their responses during the step; set --batch-size yourself")
    optimizer = optimizer_state_bytes(model, cfg.optimizer)
    can_checkpoint = hasattr(model, "gradient_checkpointing")  # an AstrAI Transformer
    original = bool(getattr(model, "gradient_checkpointing", False))

    def measure(m: int, ckpt: bool) -> int:
        batch = strategy.move_to_device(strategy.prepare_batch(collate([item] * m)))

        def step() -> None:
            with autocast():
                loss = strategy.compute_loss(batch)
            loss.backward()

        if can_checkpoint:
            model.gradient_checkpointing = ckpt
        forked = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=forked):
                before, peak = step_peak_bytes(step, device)
        except torch.OutOfMemoryError:
            before, peak = 0, math.inf  # does not fit
        finally:
            model.zero_grad(set_to_none=True)
            if can_checkpoint:
                model.gradient_checkpointing = original
        return before + optimizer + peak

    global_batch = cfg.batch_size * cfg.accumulation_steps
    return choose_micro_batch(measure, global_batch, budget,
                              checkpointing_forced=bool(cfg.activation_checkpointing),
                              can_checkpoint=can_checkpoint)
