"""Tensor-parallel layers and the tensor-parallel mode of the Transformer."""

from astrai_core.parallel.collectives import (
    copy_to_parallel,
    gather_from_parallel,
    reduce_from_parallel,
)
from astrai_core.parallel.layers import ColumnParallelLinear, ParallelModel, RowParallelLinear
from astrai_core.parallel.tensor_parallel import (
    gather_tensor_parallel_state_dict,
    parallelize_transformer,
)

__all__ = [
    "ColumnParallelLinear", "ParallelModel", "RowParallelLinear", "copy_to_parallel",
    "gather_from_parallel", "gather_tensor_parallel_state_dict", "parallelize_transformer",
    "reduce_from_parallel",
]
