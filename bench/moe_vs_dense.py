"""A mixture of experts against its dense twin on CPU: training tokens/s, the held-out loss both
reach in the same wall time on the quickstart corpus, and serving decode tok/s.

    uv run python bench/moe_vs_dense.py [--budget-s 240] [--batch 16] [--seq 128]

`small-moe` (16 routed experts of width 176, 3 per token, one shared, first layer dense) runs
6.5M of its 15.3M parameters per token; `small` has the same 6.5M (its MLP of 704 equals one
shared + 3 routed experts of 176), so the pair compares equal compute per token. Both train on
the quickstart's pretraining text (synthesized, BPE-tokenized, windows of `--seq`) with the
same optimizer, schedule, batch and seed, each for `--budget-s` seconds of wall time, one after
the other on an otherwise idle machine; the MoE side balances its experts with the
auxiliary-loss-free bias update (the Trainer's default for MoE models). The held-out loss is the
mean next-token cross entropy over the quickstart's held-out pretraining documents.

Decode tok/s is the serving engine's greedy decode of `--decode-tokens` tokens per request at
batch 1 and `--decode-batch`, best of `--repeat`, the two models interleaved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from astrai_core import AutoTokenizer
from astrai_core.model import Transformer, active_parameters, get_preset
from astrai_data import DatasetFactory
from astrai_serve import InferenceEngine, SamplingParams
from astrai_train import TrainCallback, TrainConfig, Trainer
from astrai_train.quickstart.config import QuickstartConfig
from astrai_train.quickstart.stages import make_corpus, make_dataset, make_tokenizer


class WallBudget(TrainCallback):
    """Stops the run after `seconds` of training steps and records when each loss was logged."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = 0.0
        self.elapsed = 0.0
        self.tokens = 0
        self.steps = 0

    def on_train_begin(self, context) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, context) -> None:
        self.elapsed = time.perf_counter() - self.start
        self.tokens, self.steps = context.tokens_seen, context.iteration
        if self.elapsed >= self.seconds:
            context.stop_requested = "the wall-time budget"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build(preset: str, vocab: int, seq: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset(preset, vocab_size=vocab, max_seq_len=max(seq, 256)))


@torch.inference_mode()
def heldout_loss(model: Transformer, windows: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(32):
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def heldout_windows(corpus: Path, tokenizer, seq: int) -> torch.Tensor:
    ids: list[int] = []
    for line in (corpus / "eval_pretrain.jsonl").read_text(encoding="utf-8").splitlines():
        ids += [*tokenizer.encode(json.loads(line)["text"]), tokenizer.eos_id]
    n = len(ids) // (seq + 1)
    return torch.tensor(ids[: n * (seq + 1)]).view(n, seq + 1)


def train(model: Transformer, data: Path, args, out: Path) -> WallBudget:
    dataset = DatasetFactory.load("seq", data, window_size=args.seq)
    budget = WallBudget(args.budget_s)
    config = TrainConfig(model=model, dataset=dataset, out=str(out), batch_size=args.batch,
                         max_steps=100_000, n_epoch=1000, learning_rate=args.lr,
                         warmup_steps=20, scheduler="cosine", seed=0, progress=False,
                         device="cpu", ckpt_interval=10**9, log_interval=50,
                         optimizer=args.optimizer)
    Trainer(config, [budget]).train()
    return budget


def decode_rate(model: Transformer, batch: int, new: int, vocab: int) -> float:
    """Output tokens/s of `batch` requests of a 16-token prompt decoding `new` tokens each."""
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(5, vocab, (16,), generator=gen).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    with InferenceEngine(model.eval(), max_batch_size=batch) as engine:
        engine.generate_ids(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0,
                                                        ignore_eos=True))
        engine.reset_prefix_cache()
        start = time.perf_counter()
        engine.generate_ids(prompts, params)
        return batch * new / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "astrai-bench-moe")
    args = parser.parse_args()

    qs = QuickstartConfig(out=args.work_dir, vocab_size=8192, progress=False)
    corpus = make_corpus(qs)
    tok_dir, _ = make_tokenizer(qs, corpus)
    data = make_dataset(qs, qs.plan("pretrain"), corpus, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    vocab = tokenizer.vocab_size
    windows = heldout_windows(corpus, tokenizer, args.seq)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} threads, torch {torch.__version__}; "
          f"vocab {vocab}, {len(windows)} held-out windows of {args.seq}")

    rows = {}
    for preset in ("small-moe", "small"):
        model = build(preset, vocab, args.seq)
        total = sum(p.numel() for p in model.parameters())
        active = active_parameters(model.config, total)
        budget = train(model, data, args, args.work_dir / f"run-{preset}")
        rows[preset] = dict(total=total, active=active, steps=budget.steps,
                            tokens_per_s=budget.tokens / budget.elapsed,
                            loss=heldout_loss(model, windows), model=model)
        print(f"  {preset}: {budget.steps} steps, {budget.tokens} tokens in {budget.elapsed:.0f} s, "
              f"held-out loss {rows[preset]['loss']:.3f}", flush=True)

    for batch in (1, args.decode_batch):
        runs = {p: [] for p in rows}
        for _ in range(args.repeat):  # interleaved, so both see the same machine
            for preset, row in rows.items():
                runs[preset].append(decode_rate(row["model"], batch, args.decode_tokens, vocab))
        for preset, values in runs.items():
            rows[preset][f"decode_{batch}"] = max(values)
            rows[preset][f"decode_{batch}_spread"] = (max(values) - min(values)) / max(values)

    b = args.decode_batch
    print(f"\n| model | params (active) | train tok/s | held-out loss after {args.budget_s:.0f} s "
          f"| decode tok/s, batch 1 | decode tok/s, batch {b} |")
    print("|---|---|---|---|---|---|")
    for preset, r in rows.items():
        print(f"| `{preset}` | {r['total'] / 1e6:.1f}M ({r['active'] / 1e6:.1f}M) "
              f"| {r['tokens_per_s']:,.0f} | {r['loss']:.3f} (ppl {math.exp(r['loss']):.1f}) "
              f"| {r['decode_1']:.0f} | {r[f'decode_{b}']:.0f} |")
    moe, dense = rows["small-moe"], rows["small"]
    print(f"\nMoE / dense: train tok/s {moe['tokens_per_s'] / dense['tokens_per_s']:.2f}x, "
          f"decode batch 1 {moe['decode_1'] / dense['decode_1']:.2f}x, "
          f"batch {b} {moe[f'decode_{b}'] / dense[f'decode_{b}']:.2f}x, "
          f"held-out loss {moe['loss'] - dense['loss']:+.3f} nats")
    spreads = [r[k] for r in rows.values() for k in r if k.endswith("_spread")]
    print(f"decode spread over {args.repeat} repeats: up to {statistics.fmean(spreads) * 100:.0f}% "
          f"mean, {max(spreads) * 100:.0f}% max")


if __name__ == "__main__":
    main()
