"""Native CPU kernels for serving decode steps (`small_batch.h` and its C files), built on first use."""

from astrai_serve.kernels.native import (
    BF16_MAX_ROWS,
    F32_KERNEL_ROWS,
    F32_MAX_ROWS,
    INT8_MAX_ROWS,
    SmallBatchKernels,
    disabled,
    load,
    status,
)

__all__ = ["BF16_MAX_ROWS", "F32_KERNEL_ROWS", "F32_MAX_ROWS", "INT8_MAX_ROWS", "SmallBatchKernels", "disabled", "load", "status"]
