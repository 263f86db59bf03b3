"""SEQ training throughput and peak memory: the astrai Trainer against a plain PyTorch loop over
transformers' LlamaForCausalLM, with the same shape, weights, batches and AdamW settings.

    uv run python bench/train_step.py [--preset small] [--batch 8] [--seq 256] [--steps 16]

Both sides do the same work per optimizer step: forward, cross entropy, backward, clip the
global gradient norm to 1.0, AdamW step (same hyperparameters, same fused kernel), zero the
gradients, read the loss. The Trainer also runs what it always runs (finiteness check, scheduler,
metric log, progress bar); checkpoints are off, since the plain loop writes none.

Throughput is timed in one process with the two loops interleaved step by step (a plain step
runs inside a Trainer callback, and is subtracted from the Trainer's step), so both see the same
machine: on a shared machine, other processes slow both alike instead of whichever ran when they
did. Peak memory is measured separately, each side alone in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from astrai_core.model import Transformer, get_preset
from astrai_core.model.hf import config_to_hf_llama, state_dict_to_hf

WARMUP = 2
ADAMW = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)


class Windows(torch.utils.data.Dataset):
    """Random token windows, identical in every process (seeded)."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        ids = torch.randint(0, vocab, (n, seq + 1), generator=torch.Generator().manual_seed(1))
        self.inputs, self.labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[i], "labels": self.labels[i]}


def build_ours(preset: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset(preset, use_qk_norm=False, use_gated_attention=False))  # Llama's shape


def build_hf(ours: Transformer):
    import transformers

    fields = config_to_hf_llama(ours.config)
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    fields["attn_implementation"] = "sdpa"
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    result = hf.load_state_dict(state_dict_to_hf(ours.state_dict()), strict=False)
    assert result.missing_keys in ([], ["lm_head.weight"]), result
    return hf


def plain_stepper(model, dataset, batch: int) -> Callable[[], None]:
    """One step of the textbook loop per call."""
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    batches = iter(loader)
    model.train()

    def step() -> None:
        nonlocal batches
        b = next(batches, None)
        if b is None:
            batches = iter(loader)
            b = next(batches)
        logits = model(input_ids=b["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def run_trainer(model, dataset, batch: int, steps: int, callback) -> None:
    from astrai_train import CheckpointCallback, TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            model=model, dataset=dataset, batch_size=batch, max_steps=steps,
            learning_rate=ADAMW["lr"], adam_beta1=ADAMW["betas"][0], adam_beta2=ADAMW["betas"][1],
            adam_eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"], max_grad_norm=1.0,
            scheduler="constant", out=out, log_interval=1, progress=True,
            device="cpu")
        trainer = Trainer(config, callbacks=[callback] if callback else [])
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, CheckpointCallback)]
        trainer.train()


def paired(preset: str, batch: int, seq: int, steps: int) -> dict:
    """Interleaved timing: Trainer step k, plain step k, Trainer step k+1, ..."""
    from astrai_train import TrainCallback

    ours = build_ours(preset)
    plain_step = plain_stepper(build_hf(ours), Windows(batch * 4, seq, ours.config.vocab_size), batch)
    astrai_s, plain_s, mark = [], [], [0.0]

    class Interleave(TrainCallback):
        def on_train_begin(self, ctx):
            mark[0] = time.perf_counter()

        def on_step_end(self, ctx):
            t0 = time.perf_counter()
            astrai_s.append(t0 - mark[0])
            plain_step()
            mark[0] = time.perf_counter()
            plain_s.append(mark[0] - t0)

    dataset = Windows(batch * (WARMUP + steps + 1), seq, ours.config.vocab_size)
    run_trainer(ours, dataset, batch, WARMUP + steps, Interleave())
    a, p = statistics.median(astrai_s[WARMUP:]), statistics.median(plain_s[WARMUP:])
    ratios = [q / r for r, q in zip(astrai_s[WARMUP:], plain_s[WARMUP:], strict=True)]
    return {"astrai_s": a, "plain_s": p, "tokens": batch * seq, "pair_ratio": statistics.median(ratios),
            "params": sum(t.numel() for t in ours.parameters())}


def memory(impl: str, preset: str, batch: int, seq: int, steps: int) -> dict:
    """Peak RSS of one side alone; the baseline is taken after its imports and model."""
    ours = build_ours(preset)
    if impl == "astrai":
        import astrai_train  # noqa: F401  (imported before the baseline, like transformers)

        model = ours
    else:
        model = build_hf(ours)
        del ours
    dataset = Windows(batch * (steps + 1), seq, model.config.vocab_size)
    import torch._dynamo  # noqa: F401  (every torch optimizer imports it; transformers already did)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if impl == "astrai":
        run_trainer(model, dataset, batch, steps, None)
    else:
        step = plain_stepper(model, dataset, batch)
        for _ in range(steps):
            step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mib": peak / 1024, "train_peak_mib": (peak - base) / 1024}


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.worker == "paired":
        return paired(args.preset, args.batch, args.seq, args.steps)
    return memory(args.worker, args.preset, args.batch, args.seq, 4)


def spawn(args: argparse.Namespace, role: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", role, "--preset", args.preset, "--batch",
           str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--threads",
           str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    speed = spawn(args, "paired")
    mem = {impl: spawn(args, impl) for impl in ("astrai", "transformers")}
    print(f"SEQ training step: preset={args.preset} params={speed['params']:,} "
          f"batch={args.batch}x{args.seq} fp32 CPU threads={args.threads} torch={torch.__version__}")
    print(f"AdamW {ADAMW}, clip 1.0; {args.steps} timed steps after {WARMUP} warm-up, interleaved")
    print(f"{'impl':<24}{'tokens/s':>10}{'step (s)':>10}{'peak RSS MiB':>14}{'train peak MiB':>16}")
    rows = (("astrai Trainer", speed["astrai_s"], mem["astrai"]),
            ("plain loop + HF Llama", speed["plain_s"], mem["transformers"]))
    for name, seconds, m in rows:
        print(f"{name:<24}{speed['tokens'] / seconds:>10.0f}{seconds:>10.3f}"
              f"{m['peak_rss_mib']:>14.0f}{m['train_peak_mib']:>16.0f}")
    a, h = mem["astrai"], mem["transformers"]
    print(f"ratio astrai/plain: tokens/s {speed['plain_s'] / speed['astrai_s']:.3f} "
          f"(median of per-step pairs {speed['pair_ratio']:.3f}); peak RSS "
          f"{a['peak_rss_mib'] / h['peak_rss_mib']:.3f}, train peak "
          f"{a['train_peak_mib'] / h['train_peak_mib']:.3f} (lower is better)")


if __name__ == "__main__":
    main()
