"""Serving weights: applied to a loaded model before the engine starts, by swapping its linear
layers (lm_head included); the model code never knows (ARCHITECTURE.md).

`prepare_model(model, quantize)`:
- first, q/k/v (and the attention gate) and the SwiGLU gate/up are fused into one product each
  (`astrai_core.model.fusion`): 4 products per layer instead of 7, each paying its fixed cost
  once; not when LoRA adapters will wrap those layers (`fuse=False`);
- "none" on CPU with 2 or more threads: each weight is repacked once into oneDNN's blocked
  layout and multiplied by oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel that
  torch.compile's CPU freezing uses). Same values, same dtype; the product splits over every
  thread even for one row, where torch's default `F.linear` (MKL) runs a one-row product on one
  core whatever the thread count, and oneDNN is faster for 16-64 rows too (docs/benchmarks.md).
  Where `astrai_serve.kernels` loaded, fp32 products of a decode step's few rows
  (`kernels.F32_MAX_ROWS`, tuned per CPU) run our own kernel instead, on a plain copy of the
  weight (so F32 layers hold their weights twice).
- a bf16 model on a CPU with AVX512-BF16: bf16 weights with fp32 activations (as llama.cpp's
  BF16 files), everything else (embeddings, norms, KV cache) fp32; decode steps run the fused
  blocks with the bf16 kernel, bigger batches oneDNN's bf16 product. Elsewhere a bf16 model
  keeps torch's bf16 ops.
- "int8": weights as int8 with one scale per output row (symmetric, s = max|row| / 127), run by
  fbgemm through torch's dynamic quantized linear: the activations are quantized to 8 bits on
  the fly, as llama.cpp's Q8_0 does per block of 32; up to 8 rows by our int8 x int8 kernel
  (8-bit activations per row). Two measured alternatives were slower than fp32 on an AVX2 CPU,
  so they are not used: torch's weight-only `_weight_int8pack_mm` and torchao's
  `Int8WeightOnlyConfig` (docs/benchmarks.md).
- fp32 RMSNorm layers run the kernels' one-pass RMSNorm (`KernelRMSNorm`).
- then every decoder block the kernels implement becomes a `KernelDecoderBlock`, whose decode
  steps run as one kernel call (`astrai_serve.kernels.decode_block`).

int8 activation scales are per row, never per batch: fbgemm picks one range per call from the
input's min and max, which would make a row's result depend on what else shares the batch (a
small row next to a large one lost 80-100% of its precision). So each row is divided by its
max |x|, and one extra row holding +1 and -1 pins the range to [-1, 1]; a row's output is then
the same in any batch (tests/serve/test_quantize.py checks it) and its activation error is at
most max|x_row| / 127 per element (7-bit activations, fbgemm's `reduce_range`, which avoids the
int16 saturation of AVX2's u8 x s8 multiply-add).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from astrai_core.model.fusion import fuse_projections
from astrai_core.model.linear import Linear
from astrai_core.model.norm import RMSNorm
from astrai_serve import kernels
from astrai_serve.kernels.decode_block import fuse_decoder_blocks

QUANTIZE_MODES = ("none", "int8")
INT8_MAX = 127


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers to swap: all but those whose weight their parent reads itself (MLA's
    `weights_read_directly`), which a swapped layer would not have in the parent's dtype."""
    keep = {f"{name}.{child}" if name else child for name, module in model.named_modules()
            for child in getattr(module, "weights_read_directly", ())}
    return [(n, m) for n, m in model.named_modules() if type(m) in (Linear, nn.Linear) and n not in keep]


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class PackedLinear(nn.Module):
    """A float linear layer whose weight lives in oneDNN's packed layout (CPU). Decode steps'
    few rows run `kernels/linear.c` on a plain copy where it is faster: fp32 weights up to
    `kernels.F32_MAX_ROWS` rows; bf16 weights (`weight_only_bf16`: fp32 activations in and out,
    as llama.cpp's BF16 files) up to `kernels.BF16_MAX_ROWS`, on CPUs with AVX512-BF16."""

    def __init__(self, linear: nn.Module, weight_only_bf16: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            # A copy in anonymous memory: read through a checkpoint's file mapping the kernel
            # streamed 18 instead of 23 GB/s (docs/benchmarks.md).
            weight = linear.weight.detach().clone()
            if weight_only_bf16:
                weight = weight.to(torch.bfloat16)
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.dtype = weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().clone()
        # Weight-only bf16 keeps the activations (and so the bias) fp32; oneDNN's bf16 product
        # for bigger batches wants a bf16 bias.
        self.weight_only_bf16 = weight_only_bf16
        self.bias = bias.float() if bias is not None and weight_only_bf16 else bias
        self._packed_bias = bias.to(torch.bfloat16) if bias is not None and weight_only_bf16 else bias
        # The plain copy doubles the layer's memory; the kernels make F32 decoding 1.3-1.5x faster.
        small_batch = kernels.load()
        if weight_only_bf16:
            self._kernels = small_batch if small_batch is not None and small_batch.bf16 else None
        else:
            self._kernels = small_batch if weight.dtype == torch.float32 else None
        self.weight = weight if self._kernels is not None else None

    @property
    def _max_rows(self) -> int:  # read per call, as the fused block reads it
        return kernels.BF16_MAX_ROWS if self.weight_only_bf16 else kernels.F32_MAX_ROWS

    @staticmethod
    def supported(model: nn.Module) -> bool:
        p = next(model.parameters())
        ops = getattr(torch.ops, "mkldnn", None)
        return (p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)
                and torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self._kernels is not None and flat.shape[0] <= self._max_rows and flat.dtype == torch.float32:
            small = self._kernels.linear_bf16 if self.weight_only_bf16 else self._kernels.linear_f32
            y = small(flat.contiguous(), self.weight, self.bias)
        elif self.weight_only_bf16:
            y = torch.ops.mkldnn._linear_pointwise(flat.to(torch.bfloat16), self.packed, self._packed_bias,
                                                   "none", [], "").to(x.dtype)
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        small = ", small-batch kernel" if self._kernels is not None else ""
        kind = ", bf16 weights, fp32 activations" if self.weight_only_bf16 else ""
        return (f"in={self.in_features}, out={self.out_features}, oneDNN packed{kind}{small}, "
                f"bias={self.bias is not None}")


class Int8Linear(nn.Module):
    """y ~ x W^T + b with W as int8 rows and per-row scales, activations quantized per row."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            w = linear.weight.detach().float()
            scales = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
            zero = torch.zeros(w.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated
                warnings.simplefilter("ignore")
                qweight = torch.quantize_per_channel(w, scales.double(), zero, 0, torch.qint8)
            bias = None if linear.bias is None else linear.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.bias = bias
        # Up to kernels.INT8_MAX_ROWS rows: linear.c's int8 x int8 dot on a plain copy (the
        # int8 weights again, a quarter of the fp32 bytes), activations 8-bit per row.
        self._kernels = kernels.load()
        if self._kernels is not None:
            self.qweight = qweight.int_repr().contiguous()
            self.scales = scales.contiguous()
        self._rows = torch.empty(0, self.in_features)  # scaled inputs + the pinning row, reused

    @staticmethod
    def supported() -> bool:
        ops = getattr(torch.ops, "quantized", None)
        return (ops is not None and hasattr(ops, "linear_dynamic")
                and torch.backends.quantized.engine in ("x86", "fbgemm", "onednn", "qnnpack"))

    def _scratch(self, n: int) -> torch.Tensor:
        """(n + 1, K): the row that pins the range to [-1, 1], then room for n scaled rows."""
        # A buffer made under inference_mode cannot be written outside it, and the reverse.
        if self._rows.shape[0] < n + 1 or self._rows.is_inference() != torch.is_inference_mode_enabled():
            self._rows = torch.zeros(max(n + 1, 2 * self._rows.shape[0]), self.in_features)
            self._rows[0, 0], self._rows[0, min(1, self.in_features - 1)] = 1.0, -1.0
        return self._rows[: n + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        n = flat.shape[0]
        if self._kernels is not None and n <= kernels.INT8_MAX_ROWS:
            y = self._kernels.linear_q8(flat.contiguous(), self.qweight, self.scales, self.bias)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        peak = torch.linalg.vector_norm(flat, ord=float("inf"), dim=1, keepdim=True)
        peak.clamp_min_(torch.finfo(torch.float32).tiny)
        rows = self._scratch(n)
        torch.div(flat, peak, out=rows[1:])
        y = torch.ops.quantized.linear_dynamic(rows, self.packed, True)[1:]
        if self.bias is not None:  # the kernel adds the bias to every row: undo it before rescaling
            y = torch.addcmul(self.bias, y - self.bias, peak)
        else:
            y = y * peak
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        small = ", small-batch kernel" if self._kernels is not None else ""
        return f"in={self.in_features}, out={self.out_features}, int8 (fbgemm){small}, bias={self.bias is not None}"


class KernelRMSNorm(nn.Module):
    """An fp32 RMSNorm run by `kernels/norm.c` in one pass (a decode step runs 2 per layer)."""

    def __init__(self, norm: RMSNorm, small_batch: kernels.SmallBatchKernels) -> None:
        super().__init__()
        self.weight = norm.weight.detach().clone()
        self.norm_eps = norm.norm_eps
        self._kernels = small_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"KernelRMSNorm runs fp32 activations, got {x.dtype}")
        return self._kernels.rms_norm(x.contiguous(), self.weight, self.norm_eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.norm_eps}, small-batch kernel"


def _swap_norms(model: nn.Module) -> None:
    small_batch = kernels.load()
    if small_batch is None:
        return
    for name, module in [(n, m) for n, m in model.named_modules() if type(m) is RMSNorm]:
        if module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            _swap(model, name, KernelRMSNorm(module, small_batch))


def prepare_model(model: nn.Module, quantize: str = "none", fuse: bool = True) -> nn.Module:
    """Fuse `model`'s input projections (unless `fuse` is off: LoRA adapters target the
    separate layers) and swap its linear layers (in place) for the serving kernels above;
    returns it. Off CPU, or where torch lacks the kernels, "none" keeps the layers' kernels."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization '{quantize}'; choose one of: {', '.join(QUANTIZE_MODES)}")
    p = next(model.parameters())
    if quantize == "int8" and (p.device.type != "cpu" or not Int8Linear.supported()):
        raise ValueError(f"--quantize int8 runs on CPU through torch's fbgemm kernels, which "
                         f"this torch {torch.__version__} on {p.device.type} lacks; serve "
                         "without --quantize")
    if fuse:
        fuse_projections(model)
    if p.device.type == "cpu":
        _swap_norms(model)
    if quantize == "int8":
        for name, module in _linear_modules(model):
            _swap(model, name, Int8Linear(module))
        fuse_decoder_blocks(model)
        return model
    if not PackedLinear.supported(model) or torch.get_num_threads() < 2:
        return model  # on one thread MKL's own one-row product is as fast (measured)
    weight_only_bf16 = _weight_only_bf16(model)
    for name, module in _linear_modules(model):
        try:
            packed = PackedLinear(module, weight_only_bf16)
        except RuntimeError:  # e.g. oneDNN's bf16 packing needs AVX512 or AVX-NE-CONVERT
            return model  # only the first layer can fail: every layer has the same dtype
        _swap(model, name, packed)
    if weight_only_bf16:
        # Everything but the linear layers' weights computes in fp32 (embeddings, norms, the
        # KV cache, which follows the model's dtype): the weights are what a decode step
        # reads, and bf16 halves them; the rest is small and stays exact.
        model.float()
        _swap_norms(model)
    fuse_decoder_blocks(model)
    return model


def _weight_only_bf16(model: nn.Module) -> bool:
    """A bf16 model on a CPU whose kernels run bf16 weights: serve it as bf16 weights with fp32
    activations, so decode steps run the fused kernel blocks (a bf16 model's own forward runs
    each op in Python, and oneDNN's one-row bf16 product reads slower than the kernel)."""
    p = next(model.parameters())
    small_batch = kernels.load()
    return (p.dtype == torch.bfloat16 and p.device.type == "cpu" and small_batch is not None
            and small_batch.bf16)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer (in its serving form) and
    norm; not the embedding table, of which a step reads one row per token."""
    itemsize = next(model.parameters()).element_size()
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += module.in_features * module.out_features + 4 * module.out_features
        elif isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * module.dtype.itemsize
        elif type(module) in (Linear, nn.Linear):
            total += module.in_features * module.out_features * itemsize
        elif isinstance(module, (RMSNorm, KernelRMSNorm)):
            total += module.weight.numel() * itemsize
    return total
