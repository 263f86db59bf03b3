"""Which dtype a device should compute in: the one place that answers it (training's autocast and
serving's weights both ask here; neither probes on its own).

bf16 halves memory traffic and, on hardware with bf16 units, doubles matmul throughput; where
there are none it is emulated and hundreds of times slower (a Xeon without AVX512-BF16 runs a
bf16 GEMM ~300x slower than fp32). So "auto" means bf16 only where it is native:
- CUDA: `torch.cuda.is_bf16_supported()` (Ampere and newer);
- x86 CPUs: AVX512-BF16 or AMX-BF16, the instructions oneDNN's bf16 GEMMs run on;
- anything else: fp32.

Detection runs once per process. `ASTRAI_CPU_BF16=1` or `=0` overrides the CPU answer (to test
both paths on one machine, or to opt out); an explicit dtype from the user always wins over all
of this.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
OVERRIDE_ENV = "ASTRAI_CPU_BF16"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def _detected_cpu_bf16() -> bool:
    # /proc/cpuinfo, not torch's private probes: those moved between torch releases. Off Linux
    # there is no cpuinfo and the answer is fp32, the safe one.
    return bool(cpu_flags() & set(CPU_BF16_FLAGS))


def cpu_has_native_bf16() -> bool:
    override = os.environ.get(OVERRIDE_ENV)
    if override is not None and override.strip() in ("0", "1"):
        return override.strip() == "1"
    return _detected_cpu_bf16()


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype "auto" resolves to on `device`: bf16 where native, else fp32."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def describe(device: torch.device | str = "cpu") -> str:
    """One line for logs and benchmark tables: what was detected and what "auto" picks."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model_name()
    native = "native bf16" if native_bf16(device) else "no native bf16"
    return f"{name} ({native}; auto dtype {str(compute_dtype(device)).removeprefix('torch.')})"


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
