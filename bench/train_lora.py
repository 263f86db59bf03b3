"""LoRA SFT against full SFT on the `small` preset, and activation checkpointing's cost.

On the quickstart's corpus (`astrai data synth`, `astrai tokenizer train`, `astrai data prepare`,
all run here through the CLI), a `small` base is pretrained once; then full SFT and LoRA SFT
each train from it for the same wall-clock budget, in fresh processes run one after the other
(`--repeat` times, interleaved), and report tokens/s, CPU time, the process's peak resident
memory while training (VmHWM) and the held-out chat accuracy and reply loss each reached
(`astrai_train.evaluation.score_model`). The activation-checkpointing table measures one
training step of the same model with and without it: the step's own peak memory above the
memory before it (`astrai_train.memory.step_peak_bytes`) and its time.

    uv run python bench/train_lora.py                 # the whole table
    uv run python bench/train_lora.py --quick         # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASTRAI = [sys.executable, "-m", "astrai_core.cli.main"]


def sh(args: list[str]) -> None:
    print("$ astrai " + " ".join(args[len(ASTRAI):]), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def prepare(work: Path, corpus_size: int, pretrain_steps: int) -> tuple[Path, Path, Path]:
    """Corpus, tokenizer, datasets and the pretrained `small` base (each skipped when present)."""
    data, tok = work / "data", work / "tokenizer"
    if not (data / "sft.jsonl").is_file():
        sh([*ASTRAI, "data", "synth", "--out", str(data), "--corpus-size", str(corpus_size)])
    if not (tok / "tokenizer.json").is_file():
        sh([*ASTRAI, "tokenizer", "train", "--input", str(data / "pretrain.jsonl"),
            str(data / "sft.jsonl"), "--vocab-size", "2048", "--out", str(tok), "--overwrite"])
    for kind, name in (("seq", "pretrain"), ("sft", "sft")):
        if not (data / f"{name}.h5").is_file():
            sh([*ASTRAI, "data", "prepare", "--strategy", kind, "--tokenizer", str(tok),
                "--input", str(data / f"{name}.jsonl"), "--out", str(data / f"{name}.h5"),
                "--num-workers", "0"])
    base = work / "base" / f"step_{pretrain_steps:08d}"
    if not base.is_dir():
        sh([*ASTRAI, "train", "--strategy", "seq", "--data", str(data / "pretrain.h5"),
            "--out", str(work / "base"), "--preset", "small", "--tokenizer", str(tok),
            "--max-seq-len", "256", "--batch-size", "8", "--max-steps", str(pretrain_steps),
            "--optimizer", "muon", "--learning-rate", "3e-3", "--warmup-steps", "20",
            "--ckpt-interval", str(pretrain_steps), "--no-progress", "--seed", "0"])
    return data, tok, base


def vm_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_sft(variant: str, data: Path, tok: Path, base: Path, out: Path, budget_s: float,
            lora_rank: int, eval_limit: int) -> dict:
    """One SFT run in this (fresh) process: train for `budget_s` seconds, then score."""
    import torch

    from astrai_core import AutoTokenizer
    from astrai_train import TrainCallback, Trainer
    from astrai_train.evaluation import HeldOutSet, score_model
    from astrai_train.launch import LaunchOptions, build_config
    from astrai_train.rl import build_reward

    values = {"strategy": "sft", "max_steps": 100_000, "n_epoch": 1000, "batch_size": 8,
              "learning_rate": 1e-3 if variant == "full" else 3e-3, "warmup_steps": 10,
              "seed": 0, "out": str(out), "ckpt_interval": 100_000, "log_interval": 10,
              "progress": False, "device": "cpu", "tokenizer": str(tok), "optimizer": "muon"}
    if variant == "lora":
        values["lora_rank"] = lora_rank
    opts = LaunchOptions(out=out, data=data / "sft.h5", model=base, max_seq_len=256, values=values)
    config = build_config(opts)

    class Budget(TrainCallback):
        def on_train_begin(self, ctx):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, ctx):
            if time.perf_counter() - self.t0 >= budget_s:
                ctx.stop_requested = "time budget"

    budget = Budget()
    context = Trainer(config, callbacks=[budget]).train()
    wall, cpu = time.perf_counter() - budget.t0, time.process_time() - budget.cpu0
    peak = vm_bytes("VmHWM")  # before scoring: the training's peak
    model = context.raw_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tok)
    held = HeldOutSet.load(data, limit=eval_limit)
    held.pairs, held.prompts = [], []
    with torch.no_grad():
        scores = score_model(variant, model, tokenizer, held, build_reward("exact_answer"), 24)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"variant": variant, "steps": context.iteration, "tokens": context.tokens_seen,
            "wall_s": wall, "cpu_s": cpu, "tokens_per_s": context.tokens_seen / wall,
            "peak_rss": peak, "trainable": trainable, "accuracy": scores.accuracy,
            "loss": scores.loss}


def run_checkpointing(data: Path, tok: Path, base: Path, enabled: bool, steps: int) -> dict:
    """Step time and the step's own peak memory of full SFT at batch 8 x 256 tokens."""
    import torch

    from astrai_train.builder import TrainContextBuilder
    from astrai_train.launch import LaunchOptions, build_config
    from astrai_train.memory import step_peak_bytes

    values = {"strategy": "sft", "batch_size": 8, "device": "cpu", "tokenizer": str(tok),
              "progress": False, "out": "/tmp/astrai-bench-ckpt-unused", "seed": 0,
              "activation_checkpointing": enabled}
    opts = LaunchOptions(out=Path(values["out"]), data=data / "sft.h5", model=base,
                         max_seq_len=256, values=values)
    ctx = TrainContextBuilder(build_config(opts)).build()
    batch = ctx.strategy.move_to_device(next(iter(ctx.dataloader)))
    ctx.model.train()

    def step() -> None:
        ctx.strategy.compute_loss(batch).backward()
        ctx.model.zero_grad(set_to_none=True)

    step()  # warm-up
    times, cpus, peaks = [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        _, peak = step_peak_bytes(step, torch.device("cpu"))
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        peaks.append(peak)
    return {"enabled": enabled, "step_s": statistics.median(times), "step_s_min": min(times),
            "step_s_max": max(times), "cpu_s": statistics.median(cpus),
            "peak": statistics.median(peaks)}


def child(args: argparse.Namespace) -> None:
    data, tok, base = Path(args.data), Path(args.tok), Path(args.base)
    if args.child == "ckpt":
        result = run_checkpointing(data, tok, base, args.enabled, args.steps)
    else:
        result = run_sft(args.child, data, tok, base, Path(args.out), args.budget_s,
                         args.lora_rank, args.eval_limit)
    Path(args.json).write_text(json.dumps(result))


def spawn(extra: list[str], json_path: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, __file__, *extra, "--json", str(json_path)], check=True,
                   cwd=ROOT, env=env)
    return json.loads(json_path.read_text())


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/astrai-bench-lora")
    p.add_argument("--corpus-size", type=int, default=2000)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--budget-s", type=float, default=180.0, help="SFT seconds per variant")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--eval-limit", type=int, default=60, help="held-out chats per language")
    p.add_argument("--ckpt-steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the script runs")
    # internal: one measurement in a fresh process
    p.add_argument("--child", choices=["full", "lora", "ckpt"])
    for name in ("data", "tok", "base", "out", "json"):
        p.add_argument(f"--{name}")
    p.add_argument("--enabled", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.corpus_size, args.pretrain_steps, args.budget_s = 200, 20, 15.0
        args.repeat, args.eval_limit, args.ckpt_steps = 1, 5, 2
    work = Path(args.work_dir)
    data, tok, base = prepare(work, args.corpus_size, args.pretrain_steps)
    paths = ["--data", str(data), "--tok", str(tok), "--base", str(base)]
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for r in range(args.repeat):
        for variant in ("full", "lora") if r % 2 == 0 else ("lora", "full"):
            out = work / f"sft-{variant}-{r}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            runs[variant].append(spawn(["--child", variant, *paths, "--out", str(out),
                                        "--budget-s", str(args.budget_s), "--lora-rank",
                                        str(args.lora_rank), "--eval-limit",
                                        str(args.eval_limit)], work / f"{variant}-{r}.json"))
    ckpt = {on: spawn(["--child", "ckpt", *paths, "--steps", str(args.ckpt_steps),
                       *(["--enabled"] if on else [])], work / f"ckpt-{on}.json")
            for on in (False, True)}
    print(f"\nLoRA SFT vs full SFT, `small` preset, {args.budget_s:.0f} s of training each, "
          f"batch 8 x 256 tokens, Muon, rank {args.lora_rank} on all linear layers "
          f"({args.repeat} runs each, interleaved; accuracy on {args.eval_limit} held-out chats "
          "per language)\n")
    print("| variant | trainable params | steps | tokens/s | CPU s / wall s | peak RSS | "
          "accuracy en | accuracy zh | reply loss en | reply loss zh |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant, results in runs.items():
        for res in results:
            acc, loss = res["accuracy"], res["loss"]
            print(f"| {variant} | {res['trainable']:,} | {res['steps']} | "
                  f"{res['tokens_per_s']:.0f} | {res['cpu_s']:.0f} / {res['wall_s']:.0f} | "
                  f"{mib(res['peak_rss'])} | {acc.get('en', 0):.2f} | {acc.get('zh', 0):.2f} | "
                  f"{loss.get('en', 0):.3f} | {loss.get('zh', 0):.3f} |")
    print("\nActivation checkpointing, full SFT step (forward + backward), batch 8 x 256 tokens\n")
    print("| checkpointing | step peak memory | step time (median, min-max) | CPU time |")
    print("|---|---|---|---|")
    for on, res in ckpt.items():
        print(f"| {'on' if on else 'off'} | {mib(res['peak'])} | {res['step_s']:.2f} s "
              f"({res['step_s_min']:.2f}-{res['step_s_max']:.2f}) | {res['cpu_s']:.2f} s |")
    saving = 1 - ckpt[True]["peak"] / ckpt[False]["peak"]
    cost = ckpt[True]["cpu_s"] / ckpt[False]["cpu_s"] - 1
    print(f"\ncheckpointing saves {saving:.0%} of the step's peak memory for {cost:+.0%} CPU time")


if __name__ == "__main__":
    main()
