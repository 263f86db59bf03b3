"""Process groups: start them (`setup_parallel`), spawn workers on one machine
(`spawn_parallel_fn`), or join the ones `torchrun` started (`setup_from_env`).

No port, device or backend is hard-coded: the backend follows the device (gloo on CPU, NCCL on
CUDA), a CUDA process uses the GPU of its LOCAL_RANK, and `master_port="auto"` picks a free port.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PEER_ERROR_GRACE_S = 3.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedWorkerError(RuntimeError):
    """A worker process failed; the message names its rank, `.details` holds its traceback."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def get_current_device(device_type: str = "auto") -> torch.device:
    """This process's device: its LOCAL_RANK's GPU on CUDA, else the CPU."""
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        return torch.device("cuda", get_local_rank() % max(torch.cuda.device_count(), 1))
    return torch.device(device_type)


def resolve_backend(backend: str, device_type: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if get_current_device(device_type).type == "cuda" else "gloo"


def in_torchrun() -> bool:
    """True when `torchrun` (or another launcher) set the rendezvous environment."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def setup_parallel(rank: int, world_size: int, backend: str = "auto",
                   master_addr: str = "localhost", master_port: str | int = "29500",
                   device_type: str = "auto", timeout_s: float = 600.0,
                   local_rank: int | None = None) -> None:
    """Join the default process group as `rank` of `world_size`. A collective that waits longer
    than `timeout_s` (a peer died or hangs) raises instead of blocking forever."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = str(master_addr), str(master_port)
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    device = get_current_device(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = resolve_backend(backend, device_type)
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


def setup_from_env(backend: str = "auto", device_type: str = "auto",
                   timeout_s: float = 600.0) -> None:
    """Join the process group `torchrun` describes in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*."""
    env = os.environ
    setup_parallel(int(env["RANK"]), int(env["WORLD_SIZE"]), backend, env["MASTER_ADDR"],
                   env["MASTER_PORT"], device_type, timeout_s, int(env["LOCAL_RANK"]))


def cleanup_parallel() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port(addr: str = "") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def resolve_port(master_addr: str, master_port: str | int) -> int:
    """'auto' or 0 -> a free port; a given port is checked, so a busy one fails clearly now
    rather than as a rendezvous timeout later."""
    if str(master_port) in ("auto", "0"):
        return free_port()
    try:
        port = int(master_port)
    except ValueError:
        raise ValueError(f"--master-port must be a port number or 'auto', got {master_port!r}") from None
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as exc:
            raise ValueError(f"master port {port} is already in use ({exc.strerror}); pass "
                             "--master-port with a free port, or --master-port auto to pick "
                             "one") from None
    del master_addr  # spawned workers all run on this machine: the port is checked here
    return port


def _worker(rank: int, fn: Callable[..., Any], args: tuple[Any, ...], world_size: int,
            setup: dict[str, Any]) -> None:
    if get_current_device(setup["device_type"]).type == "cpu":
        # Processes share the cores: one full-width BLAS pool each would oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    setup_parallel(rank, world_size, local_rank=rank, **setup)
    try:
        fn(*args)
    except Exception as exc:
        if not is_communication_error(exc):
            raise
        # A peer's failure shows here as a broken connection or a timeout: wait a moment so the
        # peer's own error is the one reported (spawn stops this process meanwhile).
        time.sleep(PEER_ERROR_GRACE_S)
        raise communication_error(exc, setup["timeout_s"]) from exc
    finally:
        cleanup_parallel()


def is_communication_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(w in text for w in ("gloo", "nccl", "timed out"))


def communication_error(exc: BaseException, timeout_s: float) -> RuntimeError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RuntimeError(f"a collective failed: another process died or did not answer within "
                        f"dist_timeout_s={timeout_s:g}s; see its error ({first})")


def spawn_parallel_fn(fn: Callable[..., Any], nprocs: int, *args: Any, backend: str = "auto",
                      master_addr: str = "localhost", master_port: str | int = "auto",
                      device_type: str = "auto", timeout_s: float = 600.0) -> None:
    """Run `fn(*args)` in `nprocs` new processes on this machine, each inside the process group
    (rank = process index). `fn` and `args` must be picklable. When a worker fails, the others
    are stopped and `DistributedWorkerError` names the failed rank."""
    port = resolve_port(master_addr, master_port)
    setup = {"backend": backend, "master_addr": master_addr, "master_port": port,
             "device_type": device_type, "timeout_s": timeout_s}
    try:
        mp.spawn(_worker, args=(fn, args, nprocs, setup), nprocs=nprocs, join=True)
    except mp.ProcessRaisedException as exc:
        last = exc.msg.strip().splitlines()[-1] if exc.msg.strip() else "error"
        raise DistributedWorkerError(f"rank {exc.error_index} failed: {last}",
                                     details=exc.msg) from None
    except mp.ProcessExitedException as exc:
        raise DistributedWorkerError(
            f"rank {exc.error_index} exited with code {exc.exit_code} (signal "
            f"{exc.signal_name or 'none'}) before finishing", details=traceback.format_exc()) from None
