"""Tensor-parallel forward and backward equal the unsharded model (2 CPU processes, gloo)."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from astrai_core.model import Transformer, get_preset
from astrai_core.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_tensor_parallel_state_dict,
    parallelize_transformer,
)
from tolerances import forward_bound

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_of(full_grad: torch.Tensor, module: torch.nn.Module, pname: str, rank: int) -> torch.Tensor:
    if isinstance(module, ColumnParallelLinear):
        return full_grad.chunk(WORLD, dim=0)[rank]
    if isinstance(module, RowParallelLinear) and pname == "weight":
        return full_grad.chunk(WORLD, dim=1)[rank]
    return full_grad


def _worker(rank: int, port: int, overrides: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        config = get_preset("tiny", n_heads=4, n_kv_heads=2, **overrides)
        full = Transformer(config).double()  # float64: bounds from its epsilon (tolerances.py)
        sharded = parallelize_transformer(copy.deepcopy(full))
        ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
        ref, out = full(ids), sharded(ids)
        width = max(config.dim, config.dim_ffn)
        assert (ref - out).abs().max().item() <= forward_bound(2, width, ref.abs().max().item())
        ref.square().mean().backward()
        out.square().mean().backward()
        modules = dict(sharded.named_modules())
        full_params = dict(full.named_parameters())
        for name, p in sharded.named_parameters():
            owner, _, pname = name.rpartition(".")
            expected = _shard_of(full_params[name].grad, modules[owner], pname, rank)
            # Backward runs the forward's stages again, transposed: twice the depth.
            bound = forward_bound(4, width, full_params[name].grad.abs().max().item())
            assert (p.grad - expected).abs().max().item() <= bound, name
        gathered = gather_tensor_parallel_state_dict(sharded)
        for name, tensor in full.state_dict().items():
            assert torch.equal(gathered[name], tensor), name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"use_gated_attention": True, "attention_bias": True,
                                            "attention_out_bias": True, "tie_weight": False}])
def test_tensor_parallel_matches_unsharded(overrides):
    mp.spawn(_worker, args=(_free_port(), overrides), nprocs=WORLD, join=True)


def test_tensor_parallel_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="setup_parallel"):
        ColumnParallelLinear(4, 4)
