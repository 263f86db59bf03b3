"""Batch encode throughput: AstrAI's `AutoTokenizer.encode_batch` against raw `tokenizers`
`encode_batch` on the same tokenizer and the same text, in the same run.

    uv run python bench/tokenizer.py [--tokenizer DIR] [--mb 2] [--doc-lines 10] [--repeats 10]

Without --tokenizer, a bilingual byte-level BPE (vocab 4000) is trained first on synthetic text.
Each variant runs `--repeats` times, interleaved, and the best time counts (least disturbed by
other load). The headline ratio is AstrAI over raw `encode_batch`; the last row shows the wrapper's
own cost against the fastest raw call that returns the same ids.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from astrai_core.tokenizer import AutoTokenizer, train_tokenizer

EN = ["the", "a", "model", "learns", "to", "count", "add", "and", "subtract", "numbers", "while", "reading", "short", "stories", "about", "rivers", "cities", "music", "light", "water", "small", "large", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
ZH = ["我们", "学习", "数学", "模型", "今天", "天气", "很好", "你好", "世界", "中文", "数字", "计算",
      "城市", "音乐", "河流", "故事", "问题", "答案", "时间", "朋友"]


def synthetic_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 2:
            lines.append(" ".join(rng.choices(EN, k=rng.randint(6, 18))) + f" {rng.randint(0, 9999)}.")
        else:
            lines.append("".join(rng.choices(ZH, k=rng.randint(4, 12))) + f"，{rng.randint(0, 999)}个。😀")
    return lines


def documents(megabytes: float, doc_lines: int, seed: int) -> list[str]:
    docs: list[str] = []
    size = 0
    rng_seed = seed
    while size < megabytes * 1e6:
        doc = "\n".join(synthetic_lines(doc_lines, rng_seed))
        docs.append(doc)
        size += len(doc.encode("utf-8"))
        rng_seed += 1
    return docs


def trained_tokenizer(folder: Path, vocab_size: int) -> AutoTokenizer:
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(synthetic_lines(20000, seed=10_000)), encoding="utf-8")
    train_tokenizer([corpus], vocab_size, folder / "tok", show_progress=False)
    return AutoTokenizer.from_pretrained(folder / "tok")


def best_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for run in variants.values():  # warm-up: thread pool start, caches
        run()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--mb", type=float, default=2.0, help="megabytes of text to encode")
    parser.add_argument("--doc-lines", type=int, default=10, help="lines per document in the batch")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tok = (AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
               else trained_tokenizer(Path(tmp), args.vocab_size))
    docs = documents(args.mb, args.doc_lines, seed=0)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    raw = tok.backend
    variants: dict[str, Callable[[], object]] = {
        "tokenizers encode_batch (Encoding objects)": lambda: raw.encode_batch(docs, add_special_tokens=False),
        "tokenizers encode_batch_fast -> ids": lambda: [e.ids for e in raw.encode_batch_fast(docs, add_special_tokens=False)],
        "AstrAI AutoTokenizer.encode_batch": lambda: tok.encode_batch(docs),
    }
    assert tok.encode_batch(docs) == [e.ids for e in raw.encode_batch(docs, add_special_tokens=False)]
    seconds = best_seconds(variants, args.repeats)

    baseline = seconds["tokenizers encode_batch (Encoding objects)"]
    table = Table(title=f"batch encode, {len(docs):,} documents, {megabytes:.1f} MB, vocab {tok.vocab_size:,}")
    table.add_column("implementation")
    table.add_column("MB/s", justify="right")
    table.add_column("vs raw encode_batch", justify="right")
    for name, secs in seconds.items():
        table.add_row(name, f"{megabytes / secs:.2f}", f"{baseline / secs:.2f}x")
    console = Console()
    console.print(table)
    ours = seconds["AstrAI AutoTokenizer.encode_batch"]
    same_work = seconds["tokenizers encode_batch_fast -> ids"]
    console.print(f"AstrAI / raw encode_batch throughput: {baseline / ours:.3f} "
                  f"(overhead {100 * (ours / baseline - 1):+.1f}%); "
                  f"wrapper cost over encode_batch_fast -> ids: {100 * (ours / same_work - 1):+.1f}%")


if __name__ == "__main__":
    main()
