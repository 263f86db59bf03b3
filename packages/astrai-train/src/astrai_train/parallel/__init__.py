"""Distributed training: process groups (`setup_parallel`, `spawn_parallel_fn`, torchrun) and
data parallelism (DDP, FSDP2). Tensor parallelism lives in `astrai_core.parallel`
(`ColumnParallelLinear`, `RowParallelLinear`, `ParallelModel`, `parallelize_transformer`)."""

from astrai_core.parallel import (
    ColumnParallelLinear,
    ParallelModel,
    RowParallelLinear,
    gather_tensor_parallel_state_dict,
    parallelize_transformer,
)
from astrai_train.parallel.setup import (
    DistributedWorkerError,
    cleanup_parallel,
    free_port,
    get_current_device,
    get_local_rank,
    get_rank,
    get_world_size,
    in_torchrun,
    resolve_port,
    setup_from_env,
    setup_parallel,
    spawn_parallel_fn,
)
from astrai_train.parallel.wrap import (
    PARALLEL_MODES,
    full_model_state_dict,
    full_optimizer_state_dict,
    gradient_sync,
    is_fsdp,
    load_full_optimizer_state_dict,
    resolve_parallel,
    wrap_parallel,
)

__all__ = [
    "PARALLEL_MODES", "ColumnParallelLinear", "DistributedWorkerError", "ParallelModel",
    "RowParallelLinear", "cleanup_parallel", "free_port", "full_model_state_dict",
    "full_optimizer_state_dict", "gather_tensor_parallel_state_dict", "get_current_device",
    "get_local_rank", "get_rank", "get_world_size", "gradient_sync", "in_torchrun", "is_fsdp",
    "load_full_optimizer_state_dict", "parallelize_transformer", "resolve_parallel",
    "resolve_port", "setup_from_env", "setup_parallel", "spawn_parallel_fn", "wrap_parallel",
]
