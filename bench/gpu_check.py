"""One-GPU check of the distributed training path, prepared to run as is on a CUDA machine:

    python bench/gpu_check.py [--steps 30] [--batch 16] [--seq 1024]

1. NCCL: `setup_parallel` with world size 1 (backend auto -> nccl), an all-reduce, a barrier.
2. Peak: a measured bf16 matmul rate (8192^3, the best of several runs), the MFU denominator.
3. Training: the `small` preset, bf16 autocast, DDP over that NCCL group (then a few FSDP
   steps), through the real Trainer; tokens/s over the steps after warm-up, and MFU.

FLOPs per token (forward + backward) = 6 * N + 12 * n_layers * dim * seq, where N counts every
parameter that takes part in a matmul (all but the embedding lookup; a tied lm_head counts
once, as a matmul) and the second term is the attention scores and the weighted sum of values
(2 matmuls of 2 * dim * seq FLOPs per token forward, x3 for backward, no causal discount).
MFU = tokens/s * FLOPs per token / measured peak.

Needs only torch, numpy, h5py, safetensors, tokenizers (no fastapi): the packages' src folders
are put on sys.path here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for pkg in ("astrai-core", "astrai-data", "astrai-train"):
    sys.path.insert(0, str(ROOT / "packages" / pkg / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from astrai_core import Transformer, get_preset  # noqa: E402
from astrai_data import DatasetFactory, save_h5  # noqa: E402
from astrai_train import TrainCallback, TrainConfig, Trainer  # noqa: E402
from astrai_train.parallel import cleanup_parallel, free_port, setup_parallel  # noqa: E402


def check_nccl() -> None:
    setup_parallel(0, 1, backend="auto", master_addr="127.0.0.1", master_port=free_port(),
                   device_type="cuda", timeout_s=60)
    assert dist.get_backend() == "nccl", dist.get_backend()
    x = torch.ones(4, device="cuda")
    dist.all_reduce(x)
    dist.barrier()
    assert x.sum().item() == 4
    print("nccl: init, all_reduce and barrier ok (world size 1)")


def bf16_peak_flops(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    flops = 2 * n**3 * iters / best
    print(f"bf16 matmul peak (measured, {n}^3): {flops / 1e12:.1f} TFLOP/s")
    return flops


class StepTimer(TrainCallback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.tokens, self._t0 = warmup, [], 0, 0.0

    def on_step_end(self, context) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        if context.iteration > self.warmup:
            self.times.append(now - self._t0)
            self.tokens += context.step_tokens
        self._t0 = now


def flops_per_token(model: Transformer, seq: int) -> float:
    cfg = model.config
    embed = model.embed_tokens.weight.numel() if not cfg.tie_weight else 0
    n_matmul = sum(p.numel() for p in model.parameters()) - embed
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq


def train(data: Path, out: str, parallel: str, steps: int, batch: int, seq: int,
          peak: float) -> None:
    torch.manual_seed(0)
    model = Transformer(get_preset("small", max_seq_len=seq))
    dataset = DatasetFactory.load("seq", data, window_size=seq)
    timer = StepTimer(warmup=3)
    config = TrainConfig(model=model, dataset=dataset, batch_size=batch, max_steps=steps,
                         device="cuda", dtype="bfloat16", parallel=parallel, out=out,
                         ckpt_interval=10**6, progress=False, log_interval=10,
                         scheduler="constant")
    context = Trainer(config, callbacks=[timer]).train()
    assert context.last_checkpoint is not None and np.isfinite(context.loss)
    if timer.times:
        tokens_s = timer.tokens / sum(timer.times)
        mfu = tokens_s * flops_per_token(model, seq) / peak
        print(f"{parallel}: {context.iteration} steps, loss {context.loss:.3f}, "
              f"{tokens_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% "
              f"(peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB)")
    else:
        print(f"{parallel}: {context.iteration} steps ok, loss {context.loss:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    check_nccl()
    peak = bf16_peak_flops()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(0).integers(5, 8192, args.batch * (args.steps + 2)
                                                   * (args.seq + 1))
        data = save_h5(Path(tmp) / "seq.h5", "seq", {"sequence": tokens})
        train(data, f"{tmp}/ddp", "ddp", args.steps, args.batch, args.seq, peak)
        train(data, f"{tmp}/fsdp", "fsdp", 8, args.batch, args.seq, peak)
    cleanup_parallel()
    print("gpu_check: all ok")


if __name__ == "__main__":
    main()
