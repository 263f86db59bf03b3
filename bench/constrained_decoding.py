"""The cost of grammar-constrained decoding per engine step: a batch of 64 decoding requests with
8 of them constrained by a JSON schema, against the same batch with none.

    uv run python bench/constrained_decoding.py                  # 3 interleaved repeats
    uv run python bench/constrained_decoding.py --repeat 1 --max-tokens 32   # a quick check

Model: the `small` preset with random weights and its 8192-token byte-level BPE vocabulary, as
bench/serve_online.py builds it (fp32). Workload: 64 prompts of 32 random tokens, each
generating --max-tokens tokens (forced, `ignore_eos`, temperature 0.6, seeded); the constrained
ones follow LOG_SCHEMA, an object holding an array of at least 64 log records (an integer, an
enum and a bounded string each), so none can finish early and both batches run the same number
of steps. Two figures:

- step: wall and CPU time per engine step from the engine's own counters, over the steps after
  every request has its first token (pure decode steps);
- mask: the added work alone, timed in isolation on the same vocabulary: the grammar mask step
  (8 matchers fill their bitmask, unpacked and applied to their rows of (64, V) logits) and the
  8 `accept` calls that advance the matchers, per step.

The ratio is the overhead a constrained minority costs the whole batch; a batch with no
constrained request builds no mask step at all.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from serve_online import build_model_folder

ITEM = {"type": "object", "properties": {
    "t": {"type": "integer", "minimum": 0, "maximum": 9999},
    "level": {"enum": ["info", "warn", "error"]},
    "msg": {"type": "string", "maxLength": 24}},
    "required": ["t", "level", "msg"], "additionalProperties": False}
LOG_SCHEMA = {"type": "object", "properties": {"log": {"type": "array", "items": ITEM,
                                                       "minItems": 64}},
              "required": ["log"], "additionalProperties": False}
BATCH, CONSTRAINED, PROMPT_TOKENS = 64, 8, 32


def compiler_for(engine):
    from astrai_serve.constrained import GrammarCompiler

    tok = engine.tokenizer
    return GrammarCompiler(tok, engine.model.config.vocab_size, {*tok.stop_ids, tok.eos_id})


def run_batch(engine, grammar, constrained: int, max_tokens: int, seed: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per decode step of one batch of BATCH requests."""
    from astrai_serve import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    prompts = [[rng.randrange(5, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(BATCH)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.6, ignore_eos=True,
                             seed=seed * 1000 + i, grammar=grammar if i < constrained else None)
              for i in range(BATCH)]
    results = engine.submit_many(prompts, params)
    for r in results:
        r.wait_first_token()
    stats, cpu = engine.get_stats(), time.process_time()
    for r in results:
        r.wait_completion()
    after, cpu_after = engine.get_stats(), time.process_time()
    assert all(r.generated_tokens == max_tokens for r in results)
    steps = after["steps"] - stats["steps"]
    return (1e3 * (after["busy_s"] - stats["busy_s"]) / steps, 1e3 * (cpu_after - cpu) / steps)


def mask_cost(engine, grammar, steps: int) -> tuple[float, float]:
    """(ms per step of the mask step, ms per step of the 8 accepts), timed alone."""
    from astrai_serve.sampling import TokenMaskStrategy

    vocab = engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    matchers = [grammar.matcher() for _ in range(CONSTRAINED)]
    rows = matchers + [None] * (BATCH - CONSTRAINED)
    mask_s = accept_s = 0.0
    for _ in range(steps):
        logits = torch.randn(BATCH, vocab, generator=gen)
        start = time.perf_counter()
        masked = TokenMaskStrategy(rows).apply(logits)
        mask_s += time.perf_counter() - start
        chosen = torch.multinomial(masked[:CONSTRAINED].softmax(-1), 1, generator=gen)
        start = time.perf_counter()
        for matcher, token in zip(matchers, chosen[:, 0].tolist(), strict=True):
            matcher.accept(token)
        accept_s += time.perf_counter() - start
    return 1e3 * mask_s / steps, 1e3 * accept_s / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs; median counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from astrai_serve.api.loader import EngineOptions, load_engine

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(Path(tmp))
        with load_engine(folder, EngineOptions(max_batch_size=BATCH)) as engine:
            grammar = compiler_for(engine).json_schema(LOG_SCHEMA)
            vocab = engine.model.config.vocab_size
            print(f"small preset, vocab {vocab}, {args.threads} torch threads", flush=True)
            run_batch(engine, grammar, CONSTRAINED, 8, seed=99)  # warm-up
            free, constrained = [], []
            for rep in range(args.repeat):
                free.append(run_batch(engine, None, 0, args.max_tokens, seed=rep))
                constrained.append(run_batch(engine, grammar, CONSTRAINED, args.max_tokens,
                                             seed=rep))
                print(f"  repeat {rep}: none {free[-1][0]:.1f} ms/step, "
                      f"{CONSTRAINED} constrained {constrained[-1][0]:.1f} ms/step", flush=True)
            mask_ms, accept_ms = mask_cost(engine, grammar, steps=200)
    f_wall, f_cpu = (statistics.median(x) for x in zip(*free, strict=True))
    c_wall, c_cpu = (statistics.median(x) for x in zip(*constrained, strict=True))
    print(f"\nmedian of {args.repeat} interleaved runs, batch {BATCH}, decode steps only\n")
    print("| batch | wall ms/step | CPU ms/step | vs none |\n|---|---|---|---|")
    print(f"| {BATCH} free | {f_wall:.1f} | {f_cpu:.1f} | 1.00 |")
    print(f"| {BATCH - CONSTRAINED} free + {CONSTRAINED} constrained | {c_wall:.1f} | "
          f"{c_cpu:.1f} | {c_wall / f_wall:.3f} |")
    print(f"\nmask step alone ({CONSTRAINED} of {BATCH} rows, vocab {vocab}): {mask_ms:.2f} ms; "
          f"{CONSTRAINED} accepts: {accept_ms:.3f} ms per step")


if __name__ == "__main__":
    main()
