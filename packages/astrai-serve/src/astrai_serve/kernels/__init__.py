"""Native CPU kernels for serving: small-batch linear layers (`small_batch.c`), built on first use."""

from astrai_serve.kernels.native import MAX_ROWS, SmallBatchKernels, disabled, load, status

__all__ = ["MAX_ROWS", "SmallBatchKernels", "disabled", "load", "status"]
