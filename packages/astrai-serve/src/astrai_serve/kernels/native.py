"""Builds the small-batch kernels (`small_batch.h` and its C files) once with the system C
compiler into one library and loads it (ctypes).

Why our own kernels: at a few rows a linear layer is a read of its weights, and neither of
torch's CPU paths reads at the memory's speed there. On a 2-core AMD EPYC (AVX2) a decode step's
49 fp32 products read 24 GB/s through `linear.c` against 18 through oneDNN's packed GEMM
and 16 through MKL; up to 16 rows its register-tiled product is still faster than oneDNN's. The
int8 dot (int8 weights and activations) runs 2.6x fbgemm's at one row for one layer (1.8x over
a whole step's layers, Python included). Beyond `F32_MAX_ROWS` / `INT8_MAX_ROWS` oneDNN and
fbgemm are faster, and stay in use there (docs/benchmarks.md). A decode step's blocks run as
one call each (`decode_block.py`).

Loading is best effort: without an x86-64 CPU with AVX2 and FMA, a C compiler (`$CC`, else
`cc`), or with `ASTRAI_NATIVE_KERNELS=0`, `load()` returns None and serving keeps torch's
kernels; `status()` says why. The library is cached by a hash of its source, flags and compiler
(`$XDG_CACHE_HOME/astrai/kernels`), written under a temporary name and renamed into place, so a
crash mid-build never leaves a half-written library for the next process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from astrai_core.capability import cpu_flags

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
SOURCES = ("linear.c", "linear_bf16.c", "norm.c", "attention.c", "decode_layer.c")  # one library: small_batch.h
HEADERS = ("simd.h", "small_batch.h")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
REQUIRED_CPU_FLAGS = ("avx2", "fma")
# linear_bf16.c's instructions: its functions are compiled for them alone and called only where
# the CPU has every one (the library itself needs only AVX2).
BF16_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
DISABLE_ENV = "ASTRAI_NATIVE_KERNELS"
# Up to here the kernels beat torch's (docs/benchmarks.md); beyond, torch's run. Read per call,
# so a test may raise them to what the kernels take (F32_KERNEL_ROWS).
F32_KERNEL_ROWS = 16  # the most rows the f32 kernel is tuned for and tested at
# fp32 against oneDNN, 2-core AMD EPYC Milan (AVX2): 1.3x at 1 row, 1.12x at 16, 0.93x at 64.
# Where the CPU has AVX512, oneDNN multiplies with it and wins from 2 rows (AMD EPYC Turin: 0.9x
# at 2 rows, 0.6x at 16; whole 16-sequence decode 1.26x faster on oneDNN), so the AVX2 kernel
# takes one-row steps only.
F32_MAX_ROWS = 1 if "avx512f" in cpu_flags() else F32_KERNEL_ROWS
INT8_MAX_ROWS = 8  # int8 layers against fbgemm's: 1.8x at 1 row, 1.2x at 8, 0.86-1.15x at 16
BF16_MAX_ROWS = 8  # bf16 weights against oneDNN's bf16 product: 1.1-1.3x at 1 row, even at 4, 0.9x at 8 (AMD EPYC Turin)
BUILD_TIMEOUT_S = 120

_c_ptr, _c_i64, _c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


F32, Q8, BF16 = 0, 1, 2  # small_batch.h's weight formats


class LinearRef(ctypes.Structure):
    """small_batch.h's `astrai_linear_ref`: one fp32, int8 (with row scales) or bf16 linear layer."""

    _fields_ = [("weight", _c_ptr), ("scales", _c_ptr), ("bias", _c_ptr), ("n", _c_i64), ("k", _c_i64),
                ("format", _c_i64)]


class DecodeLayer(ctypes.Structure):
    """small_batch.h's `astrai_decode_layer`: the weights and shape of one decoder block. It
    holds raw pointers: the tensors must outlive it (the block that owns them keeps both)."""

    _fields_ = [("qkv", LinearRef), ("o", LinearRef), ("gate_up", LinearRef), ("down", LinearRef),
                ("input_norm", _c_ptr), ("post_norm", _c_ptr), ("q_norm", _c_ptr), ("k_norm", _c_ptr),
                ("norm_eps", ctypes.c_float), ("qk_norm_eps", ctypes.c_float), ("layer", _c_i64),
                ("heads", _c_i64), ("kv_heads", _c_i64), ("head_dim", _c_i64), ("gated", _c_i64)]


class DecodeStep(ctypes.Structure):
    """small_batch.h's `astrai_decode_step`: what every layer of one decode step shares."""

    _fields_ = [("cos", _c_ptr), ("sin", _c_ptr), ("k_cache", _c_ptr), ("v_cache", _c_ptr),
                ("k_layer_stride", _c_i64), ("v_layer_stride", _c_i64), ("slots", _c_ptr),
                ("pages", _c_ptr), ("lengths", _c_ptr), ("rows", _c_i64), ("page_size", _c_i64),
                ("max_pages", _c_i64), ("splits", _c_i64), ("scale", ctypes.c_float), ("scratch", _c_ptr),
                ("threads", _c_int)]


@dataclass(frozen=True)
class SmallBatchKernels:
    lib: ctypes.CDLL
    path: Path

    def __post_init__(self) -> None:
        self.lib.astrai_linear_f32.argtypes = [_c_ptr] * 4 + [_c_i64] * 3 + [_c_int]
        self.lib.astrai_linear_q8.argtypes = [_c_ptr] * 7 + [_c_i64] * 3 + [_c_int]
        self.lib.astrai_linear_bf16.argtypes = [_c_ptr] * 5 + [_c_i64] * 3 + [_c_int]
        self.lib.astrai_rms_norm.argtypes = [_c_ptr, _c_ptr, ctypes.c_float, _c_ptr, _c_i64, _c_i64, _c_int]
        self.lib.astrai_paged_decode_attention.argtypes = [_c_ptr] * 7 + [_c_i64] * 8 + [ctypes.c_float, _c_int]
        self.lib.astrai_rope_decode_attention.argtypes = (
            [_c_ptr] * 3 + [_c_i64] * 3 + [_c_ptr] * 9 + [_c_i64] * 8 + [ctypes.c_float, _c_int])
        self.lib.astrai_decode_layer_forward.argtypes = [
            ctypes.POINTER(DecodeLayer), ctypes.POINTER(DecodeStep), _c_ptr, _c_ptr]
        self.lib.astrai_decode_layer_scratch.argtypes = [ctypes.POINTER(DecodeLayer)] + [_c_i64] * 4
        self.lib.astrai_decode_layer_scratch.restype = _c_i64
        self.lib.astrai_attention_scratch.argtypes = [_c_i64] * 7
        self.lib.astrai_attention_scratch.restype = _c_i64
        for fn in (self.lib.astrai_linear_f32, self.lib.astrai_linear_q8, self.lib.astrai_linear_bf16,
                   self.lib.astrai_rms_norm,
                   self.lib.astrai_paged_decode_attention, self.lib.astrai_rope_decode_attention,
                   self.lib.astrai_decode_layer_forward):
            fn.restype = None

    def linear_f32(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) fp32 contiguous; weight (N, K) fp32 contiguous -> (M, N)."""
        (m, k), n = x.shape, weight.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        self.lib.astrai_linear_f32(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), m, n, k,
                                   torch.get_num_threads())
        return y

    def linear_q8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) fp32 contiguous, quantized here per row; qweight (N, K) int8 with per-row
        `scales` (N,) -> (M, N) fp32."""
        (m, k), n = x.shape, qweight.shape[0]
        qx, sx = torch.empty(m, k, dtype=torch.int8), torch.empty(m, dtype=torch.float32)
        y = torch.empty(m, n, dtype=torch.float32)
        self.lib.astrai_linear_q8(_ptr(x), _ptr(qx), _ptr(sx), _ptr(qweight), _ptr(scales), _ptr(bias),
                                  _ptr(y), m, n, k, torch.get_num_threads())
        return y

    @property
    def bf16(self) -> bool:
        """Whether `linear_bf16` may run: the CPU has AVX512-BF16 (its own flags, not
        capability's ASTRAI_CPU_BF16 override, which cannot add instructions)."""
        return all(f in cpu_flags() for f in BF16_CPU_FLAGS)

    def linear_bf16(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) fp32 contiguous; weight (N, K) bf16 contiguous; bias fp32 -> (M, N) fp32.
        Only where `bf16` holds (an illegal instruction otherwise)."""
        if not self.bf16:
            raise RuntimeError("linear_bf16 needs a CPU with AVX512-BF16 (avx512_bf16 in /proc/cpuinfo)")
        (m, k), n = x.shape, weight.shape[0]
        xb = torch.empty(m, k, dtype=torch.bfloat16)
        y = torch.empty(m, n, dtype=torch.float32)
        self.lib.astrai_linear_bf16(_ptr(x), _ptr(xb), _ptr(weight), _ptr(bias), _ptr(y), m, n, k,
                                    torch.get_num_threads())
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (..., K) fp32 contiguous, weight (K,) fp32 -> the same shape."""
        k = x.shape[-1]
        y = torch.empty_like(x)
        self.lib.astrai_rms_norm(_ptr(x), _ptr(weight), eps, _ptr(y), x.numel() // k, k,
                                 torch.get_num_threads())
        return y

    def paged_decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               pages: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """q (B, H, D) fp32 contiguous, one query per row; k_cache (n_pages, page_size, Hkv, D)
        and v_cache (n_pages, page_size, Hkv, Dv), one layer; pages (B, max_pages) and
        lengths (B,) int64 -> (B, H, Dv)."""
        (b, h, d), (_, page_size, hkv, dv) = q.shape, v_cache.shape
        splits, scratch = self.attention_scratch(b, h, d, dv, page_size, pages.shape[1])
        out = torch.empty(b, h, dv, dtype=torch.float32)
        self.lib.astrai_paged_decode_attention(
            _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(pages), _ptr(lengths), _ptr(out),
            _ptr(scratch) + 4 * b * h * d, b, h, hkv, d, dv, page_size, pages.shape[1], splits, scale,
            torch.get_num_threads())
        return out

    def rope_decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor,
                              lengths: torch.Tensor, scale: float, splits: int, scratch: torch.Tensor
                              ) -> torch.Tensor:
        """RoPE on q (..., B, H, D) and k (..., B, Hkv, D), k and v (..., B, Hkv, Dv) written at
        `slots` (B,) of `layer` in k_cache / v_cache (layers, n_pages, page_size, heads, dim),
        then `paged_decode_attention` -> (B, H, Dv). q/k/v fp32, each token's heads one
        contiguous run (they may be column slices of one tensor); cos/sin (..., B, D) fp32
        contiguous; `splits` and `scratch` from `attention_scratch`. Called once per layer of a
        decode step, so it indexes nothing: every view it would make costs a microsecond."""
        b, h, d = q.shape[-3:]
        _, _, page_size, hkv, dv = v_cache.shape
        out = torch.empty(b, h, dv, dtype=torch.float32)
        self.lib.astrai_rope_decode_attention(
            _ptr(q), _ptr(k), _ptr(v), q.stride(-3), k.stride(-3), v.stride(-3), _ptr(cos), _ptr(sin),
            _ptr(k_cache) + 4 * layer * k_cache.stride(0), _ptr(v_cache) + 4 * layer * v_cache.stride(0),
            _ptr(slots), _ptr(pages), _ptr(lengths), _ptr(out), _ptr(scratch),
            b, h, hkv, d, dv, page_size, pages.shape[1], splits, scale, torch.get_num_threads())
        return out

    def decode_layer(self, layer: DecodeLayer, step: DecodeStep, x: torch.Tensor) -> torch.Tensor:
        """One decoder block over x (..., rows, dim) fp32 contiguous -> the same shape, this
        step's keys and values written; `step.scratch` must hold `decode_layer_scratch`."""
        out = torch.empty_like(x)
        self.lib.astrai_decode_layer_forward(ctypes.byref(layer), ctypes.byref(step), _ptr(x), _ptr(out))
        return out

    def decode_layer_scratch(self, layer: DecodeLayer, step: DecodeStep) -> int:
        """Floats of scratch `decode_layer` needs for this layer and step."""
        return self.lib.astrai_decode_layer_scratch(ctypes.byref(layer), step.rows, step.page_size,
                                                    step.max_pages, step.splits)

    @staticmethod
    def attention_splits(b: int, max_pages: int) -> int:
        """Key splits of a decode attention call over B rows: each thread gets two tasks, into
        at most one a page."""
        threads = torch.get_num_threads()
        return 1 if b >= 2 * threads else max(1, min(-(-2 * threads // b), max_pages))

    def attention_scratch(self, b: int, h: int, d: int, dv: int, page_size: int,
                          max_pages: int) -> tuple[int, torch.Tensor]:
        """The key splits of a decode attention call over B rows and the scratch it needs,
        reusable across layers."""
        splits = self.attention_splits(b, max_pages)
        return splits, torch.empty(self.attention_floats(b, h, d, dv, page_size, max_pages, splits),
                                   dtype=torch.float32)

    def attention_floats(self, b: int, h: int, d: int, dv: int, page_size: int, max_pages: int,
                         splits: int) -> int:
        """Scratch floats of one call: the rotated queries, the scores, each split's partial."""
        return self.lib.astrai_attention_scratch(b, h, d, dv, page_size, max_pages, splits)


class _Unavailable(Exception):
    """Why the kernels are not in use: one line for `status()`."""


@functools.cache
def _load() -> SmallBatchKernels | str:
    try:
        return _build_and_load()
    except _Unavailable as why:
        log.info("small-batch CPU kernels off: %s", why)
        return str(why)


def load() -> SmallBatchKernels | None:
    """The loaded kernels, or None where they cannot run (see `status()`)."""
    kernels = _load()
    return kernels if isinstance(kernels, SmallBatchKernels) else None


def status() -> str:
    """One line for logs and benchmarks: the library in use, or why there is none."""
    kernels = _load()
    return f"small-batch kernels: {kernels.path}" if isinstance(kernels, SmallBatchKernels) \
        else f"small-batch kernels off ({kernels})"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Serving as without the kernels, for A/B runs in one process: models prepared and steps
    run inside use torch's kernels (a model prepared outside keeps the layers it was given)."""
    before = os.environ.get(DISABLE_ENV)
    os.environ[DISABLE_ENV] = "0"
    _load.cache_clear()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DISABLE_ENV, None)
        else:
            os.environ[DISABLE_ENV] = before
        _load.cache_clear()


def _build_and_load() -> SmallBatchKernels:
    if os.environ.get(DISABLE_ENV, "").strip() == "0":
        raise _Unavailable(f"{DISABLE_ENV}=0")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise _Unavailable(f"built for Linux on x86-64, this is {platform.system()} on {platform.machine()}")
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        raise _Unavailable(f"the CPU lacks {', '.join(missing)}")
    if "OpenMP" not in torch.__config__.parallel_info():
        raise _Unavailable("torch was not built with OpenMP, the runtime the kernels share with it")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        raise _Unavailable(f"no C compiler found (set CC, or install gcc: {compiler or 'cc'} is missing)")
    path = _cached_build(compiler)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:  # e.g. a file damaged after it was cached
        raise _Unavailable(f"could not load {path} ({err}); delete it to rebuild") from None
    runtimes = _openmp_runtimes()
    if len(runtimes) > 1:  # two thread pools would fight over the cores
        raise _Unavailable(f"the library loaded a second OpenMP runtime: {sorted(runtimes)}")
    return SmallBatchKernels(lib, path)


def _cached_build(compiler: str) -> Path:
    texts = [name.encode() + b"\0" + (FOLDER / name).read_bytes() for name in SOURCES + HEADERS]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(b"\0".join([*texts, " ".join(FLAGS).encode(), version.encode()])).hexdigest()
    folder = _cache_folder()
    path = folder / f"small_batch-{digest[:16]}.so"
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, *(str(FOLDER / name) for name in SOURCES), "-o", tmp],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise _Unavailable(f"{compiler} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        os.replace(tmp, path)  # atomic: another process sees no file or the whole file
    except (OSError, subprocess.TimeoutExpired) as err:
        raise _Unavailable(f"building with {compiler} failed: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _cache_folder() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "astrai" / "kernels"
    for folder in (base, Path(tempfile.gettempdir()) / f"astrai-kernels-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise _Unavailable(f"no writable cache folder ({base} or the temporary folder)")


def _openmp_runtimes() -> set[str]:
    """The OpenMP libraries mapped into this process (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps.splitlines()
            if line.split() and any(n in line.split()[-1].rsplit("/", 1)[-1] for n in names)}
