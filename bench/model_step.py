"""Forward+backward tokens/s and peak memory: AstrAI's Transformer against transformers'
LlamaForCausalLM with the same shape, weights and batch, in the same run.

    uv run python bench/model_step.py [--preset small] [--batch 8] [--seq 256] [--steps 10]

Speed: both models step alternately in one process (so machine load hits both alike), median
of per-step times. Memory: each implementation runs alone in a subprocess for its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from astrai_core.model import Transformer, get_preset
from astrai_core.model.hf import config_to_hf_llama, state_dict_to_hf


def build(impl: str, preset: str):
    config = get_preset(preset, use_qk_norm=False, use_gated_attention=False)
    torch.manual_seed(0)
    ours = Transformer(config)
    if impl == "astrai":
        return ours, config
    import transformers

    hf_fields = config_to_hf_llama(config)
    hf_fields["rope_parameters"] = {"rope_type": "default", "rope_theta": hf_fields.pop("rope_theta")}
    hf_fields["attn_implementation"] = "sdpa"
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_fields))
    missing = hf.load_state_dict(state_dict_to_hf(ours.state_dict()), strict=False)
    assert not missing.missing_keys or missing.missing_keys == ["lm_head.weight"], missing
    return hf, config


def run_one(impl: str, preset: str, batch: int, seq: int, steps: int) -> dict:
    torch.set_num_threads(2)
    model, config = build(impl, preset)
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        out = model(inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    median = statistics.median(times)
    return {"impl": impl, "tokens_per_s": batch * seq / median, "median_s": median,
            "peak_rss_mib": peak / 1024, "step_peak_mib": (peak - base_rss) / 1024,
            "params": sum(p.numel() for p in model.parameters())}


def interleaved_speed(preset: str, batch: int, seq: int, steps: int) -> dict[str, float]:
    torch.set_num_threads(2)
    models = {impl: build(impl, preset)[0].train() for impl in ("astrai", "transformers")}
    config = get_preset(preset)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step(model) -> float:
        t0 = time.perf_counter()
        out = model(inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {impl: [] for impl in models}
    for i in range(steps + 2):
        for impl, model in models.items():
            elapsed = step(model)
            if i >= 2:  # warm-up
                times[impl].append(elapsed)
    return {impl: batch * seq / statistics.median(t) for impl, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args.preset, args.batch, args.seq, args.steps)))
        return
    results = {}
    for impl in ("astrai", "transformers"):  # memory: each alone in a fresh process
        cmd = [sys.executable, __file__, "--worker", impl, "--preset", args.preset,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", "2"]
        results[impl] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    speed = interleaved_speed(args.preset, args.batch, args.seq, args.steps)
    for impl, tokens_per_s in speed.items():
        results[impl]["tokens_per_s"] = tokens_per_s
        results[impl]["median_s"] = args.batch * args.seq / tokens_per_s
    a, h = results["astrai"], results["transformers"]
    print(f"preset={args.preset} params={a['params']:,} batch={args.batch}x{args.seq} fp32 CPU "
          f"threads=2 torch={torch.__version__}")
    print(f"{'impl':<14}{'tokens/s':>12}{'step (s)':>10}{'peak RSS MiB':>14}{'step peak MiB':>15}")
    for r in (a, h):
        print(f"{r['impl']:<14}{r['tokens_per_s']:>12.0f}{r['median_s']:>10.3f}"
              f"{r['peak_rss_mib']:>14.0f}{r['step_peak_mib']:>15.0f}")
    print(f"ratio astrai/transformers tokens/s: {a['tokens_per_s'] / h['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
