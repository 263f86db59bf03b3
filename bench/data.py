"""astrai-data benchmarks, each against a peer on the same work in the same run:

1. preprocessing throughput: `astrai_data.prepare` (JSONL -> HDF5, worker processes) against a
   plain `tokenizers` `encode_batch` over the same texts already in memory (target ratio >= 0.8);
2. random 2048-token window reads from a locally generated file of 100M tokens: SEQDataset over
   HDF5 against a raw np.memmap of the same tokens (target p99 < 1 ms);
3. peak memory while preparing inputs of two sizes (should not grow with the input).

    uv run python bench/data.py [--mb 40] [--tokens 100_000_000] [--reads 20000] [--workers N]

Every measurement that needs a clean process (tokenizer threads, peak RSS) runs in its own
subprocess. Generated files live in a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_corpus(folder: Path, megabytes: float) -> Path:
    """The synthetic pretraining text, repeated up to about `megabytes` MB."""
    from astrai_data.synth import synthesize

    synthesize(folder / "synth", size=2000, seed=0)
    lines = (folder / "synth" / "pretrain.jsonl").read_bytes().splitlines(keepends=True)
    path = folder / f"corpus-{megabytes:g}mb.jsonl"
    with open(path, "wb") as f:
        written, i = 0, 0
        while written < megabytes * 1e6:
            f.write(lines[i % len(lines)])
            written += len(lines[i % len(lines)])
            i += 1
    return path


def make_tokenizer(folder: Path) -> Path:
    from astrai_core.tokenizer import train_tokenizer

    train_tokenizer([folder / "synth" / "pretrain.jsonl"], 4096, folder / "tok", show_progress=False)
    return folder / "tok"


# ---- subprocess jobs --------------------------------------------------------------------------

def job_baseline(corpus: str, tok: str, method: str) -> dict:
    """Plain `tokenizers`: `method` (encode_batch or encode_batch_fast) over texts already in
    memory, in one call so the Rust side parallelises it as it likes (reading is not timed)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tok) / "tokenizer.json"))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    start = time.perf_counter()
    encodings = getattr(tokenizer, method)(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(len(e.ids) for e in encodings)}


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def job_prepare(corpus: str, tok: str, out: str, workers: int) -> dict:
    from astrai_data.prepare import PrepareConfig, prepare

    before = _status_mib("VmRSS")
    # Reset the peak so it measures the run, not the imports (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    report = prepare("seq", [corpus], out, tok, PrepareConfig(num_workers=workers))
    return {"seconds": report.seconds, "tokens": report.tokens - report.records,  # without eos
            "rss_before_mib": before, "peak_main_mib": _status_mib("VmHWM"),
            "peak_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_job(*args: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, __file__, "--job", *args], capture_output=True,
                         text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- window reads -----------------------------------------------------------------------------

def write_token_file(folder: Path, n_tokens: int, vocab: int) -> tuple[Path, Path]:
    """The same random tokens as an HDF5 dataset and as a raw .bin for np.memmap."""
    from astrai_data.storage import H5Writer, StorageMeta

    meta = StorageMeta(kind="seq", keys=["sequence"], info={"vocab_size": vocab})
    rng = np.random.default_rng(0)
    h5, raw = folder / "tokens.h5", folder / "tokens.bin"
    with H5Writer(h5, meta) as writer, open(raw, "wb") as f:
        for start in range(0, n_tokens, 1 << 22):
            block = rng.integers(0, vocab, min(1 << 22, n_tokens - start), dtype=np.uint16)
            writer.append("sequence", block)
            f.write(block.tobytes())
    return h5, raw


def time_reads(read, n_windows: int, reads: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    for i in rng.integers(0, n_windows, 200):  # warm-up: file handles, caches
        read(int(i))
    times = np.empty(reads)
    for k, i in enumerate(rng.integers(0, n_windows, reads)):
        start = time.perf_counter()
        read(int(i))
        times[k] = time.perf_counter() - start
    return times * 1e3


def bench_windows(folder: Path, n_tokens: int, reads: int, window: int = 2048) -> list[tuple]:
    import torch

    from astrai_data import DatasetFactory

    h5, raw = write_token_file(folder, n_tokens, vocab=32000)
    dataset = DatasetFactory.load("seq", h5, window_size=window)
    memmap = np.memmap(raw, dtype=np.uint16, mode="r")

    def memmap_item(i: int) -> dict:  # what a nanoGPT-style loader does per window
        ids = torch.from_numpy(memmap[i * window:i * window + window + 1].astype(np.int64))
        return {"input_ids": ids[:-1], "labels": ids[1:]}

    rows = [("astrai SEQDataset[i] (HDF5)", time_reads(dataset.__getitem__, len(dataset), reads)),
            ("astrai storage.fetch (HDF5)",
             time_reads(lambda i: dataset.storage.fetch(i * window, i * window + window + 1),
                        len(dataset), reads)),
            ("np.memmap window + tensor", time_reads(memmap_item, len(dataset), reads))]
    return [(name, float(np.median(t)), float(np.percentile(t, 99))) for name, t in rows]


# ---- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=40.0, help="Input text size for throughput.")
    parser.add_argument("--tokens", type=int, default=100_000_000, help="Tokens in the read file.")
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="Throughput runs per job (best kept).")
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        name, *rest = args.job
        result = job_baseline(*rest) if name == "baseline" else job_prepare(*rest[:3], int(rest[3]))
        print(json.dumps(result))
        return

    folder = Path(tempfile.mkdtemp(prefix="astrai-bench-data-"))
    try:
        run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args: argparse.Namespace, folder: Path) -> None:
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, workers={args.workers}")
    small = make_corpus(folder, args.mb / 4)
    big = make_corpus(folder, args.mb)
    tok = make_tokenizer(folder)

    # Interleaved rounds, best of each: other load on the machine hits all three alike.
    jobs = {"tokenizers encode_batch (in memory)": ("baseline", str(big), str(tok), "encode_batch"),
            "tokenizers encode_batch_fast (in memory)": ("baseline", str(big), str(tok),
                                                         "encode_batch_fast"),
            "astrai prepare (JSONL -> HDF5)": ("prepare", str(big), str(tok),
                                               str(folder / "out.h5"), str(args.workers))}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, job in jobs.items():
            r = run_job(*job)
            r["rate"] = r["tokens"] / r["seconds"]
            if name not in best or r["rate"] > best[name]["rate"]:
                best[name] = r
    print(f"\n1. preprocessing throughput, {big.stat().st_size / 1e6:.0f} MB of JSONL, "
          f"{best['astrai prepare (JSONL -> HDF5)']['tokens']:,} tokens, best of {args.rounds}")
    print(f"{'':<44}{'tokens/s':>14}{'seconds':>10}")
    for name, r in best.items():
        print(f"{name:<44}{r['rate']:>14,.0f}{r['seconds']:>10.2f}")
    ours = best.pop("astrai prepare (JSONL -> HDF5)")["rate"]
    peer = max(r["rate"] for r in best.values())
    print(f"ratio astrai/best tokenizers: {ours / peer:.2f} (target >= 0.8)")

    print(f"\n2. random window reads: 2048 tokens from {args.tokens:,} tokens, {args.reads:,} reads")
    print(f"{'':<36}{'median ms':>10}{'p99 ms':>10}")
    for name, median, p99 in bench_windows(folder, args.tokens, args.reads):
        print(f"{name:<36}{median:>10.3f}{p99:>10.3f}")

    print("\n3. memory while preparing, MiB (RSS after imports, which include torch; the peak")
    print("   during the run; the largest worker's peak, shared pages of the parent included)")
    print(f"{'input':>10}{'before':>10}{'main peak':>12}{'growth':>9}{'worker peak':>13}")
    for path in (small, big):
        r = run_job("prepare", str(path), str(tok), str(folder / "mem.h5"), str(args.workers))
        print(f"{path.stat().st_size / 1e6:>8.0f}MB{r['rss_before_mib']:>10.0f}"
              f"{r['peak_main_mib']:>12.0f}{r['peak_main_mib'] - r['rss_before_mib']:>9.0f}"
              f"{r['peak_worker_mib']:>13.0f}")


if __name__ == "__main__":
    main()
