"""Multiple-choice scoring through the lm-eval adapter (`astrai_train.evaluation`) against a
plain loop of forward passes over the same requests, in the same run.

    uv run python bench/eval_mc.py                                  # small preset, quick
    uv run python bench/eval_mc.py --questions 1000 --baseline-questions 100

Work: Q questions, each a 256-token context (random token ids) and 4 answers of 1 to 8 tokens,
so 4 Q log-likelihood requests, as lm-eval hands them to `AstraiLM._loglikelihood_tokens`
(after tokenizing: the benchmark starts from token ids). Random weights of the `small` preset,
fp32.

- adapter, engine: the serving engine scores each answer as a forced generation, the context
  through its prefix cache (the default of `astrai eval`);
- adapter, model: direct batched forwards, each distinct context once, then the answers
  against its K/V;
- plain loop: one forward of context + answer per request, logits at every position, then
  log_softmax and a gather (what a straightforward harness model does with batch size 1). It
  is slow, so it runs on the first --baseline-questions questions and is scaled to 1,000.

Times are per 1,000 questions: wall clock and process CPU time (all threads, the engine's step
loop included), best of --repeat runs. The scores of every method are checked against the
plain loop's on the questions both ran. Each repeat starts from an empty prefix cache; the
warm-up (other questions) runs first, since the first forward of each new shape is slow.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from astrai_core import Transformer, get_preset
from astrai_core.capability import describe

CONTEXT, CHOICES, ANSWER = 256, 4, (1, 8)


class _Tokenizer:
    """What the adapter needs of a tokenizer when requests arrive as token ids."""

    eos_id = 0
    stop_ids = ()
    chat_template = ""

    def fingerprint(self) -> str:
        return "bench"


def make_requests(questions: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(questions):
        context = [rng.randrange(5, vocab) for _ in range(CONTEXT)]
        for _ in range(CHOICES):
            out.append((context, [rng.randrange(5, vocab) for _ in range(rng.randint(*ANSWER))]))
    return out


def as_harness(requests):
    return [(("", ""), c, k) for c, k in requests]


@torch.inference_mode()
def plain_loop(model, requests) -> list[float]:
    out = []
    for context, answer in requests:
        ids = torch.tensor([context + answer[:-1]])
        logp = model(ids)[0].float().log_softmax(-1)
        positions = torch.arange(len(context) - 1, len(context) + len(answer) - 1)
        out.append(float(logp[positions, torch.tensor(answer)].double().sum()))
    return out


def timed(fn, repeat: int, setup=None) -> tuple[float, float, object]:
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeat):
        if setup is not None:
            setup()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--baseline-questions", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="engine requests at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from astrai_train.evaluation.lm_eval_adapter import AstraiLM

    config = get_preset(args.preset)
    torch.manual_seed(args.seed)
    model = Transformer(config).eval()
    requests = make_requests(args.questions, config.vocab_size, args.seed)
    baseline = requests[:CHOICES * args.baseline_questions]
    warm = make_requests(2, config.vocab_size, args.seed + 1)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{args.questions} questions x {CHOICES} answers of {ANSWER[0]}-{ANSWER[1]} tokens, "
          f"{CONTEXT}-token contexts; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {describe('cpu')}; {platform.processor() or platform.machine()}")

    rows, scores = [], {}
    for scoring in ("engine", "model"):
        lm = AstraiLM(model=model, tokenizer=_Tokenizer(), scoring=scoring,
                      batch_size=args.batch_size)
        lm._loglikelihood_tokens(as_harness(warm))
        # A repeat must not find the previous run's contexts in the prefix cache.
        reset = lm.engine.reset_prefix_cache if scoring == "engine" else None
        wall, cpu, got = timed(lambda lm=lm: lm._loglikelihood_tokens(as_harness(requests)),
                               args.repeat, reset)
        lm.close()
        scores[scoring] = [lp for lp, _ in got]
        rows.append((f"adapter, scoring={scoring}", wall, cpu, args.questions))
    plain_loop(model, warm[:CHOICES])
    wall, cpu, reference = timed(lambda: plain_loop(model, baseline), args.repeat)
    rows.append(("plain loop of forwards", wall, cpu, args.baseline_questions))

    per_k = {name: (w * 1000 / q, c * 1000 / q) for name, w, c, q in rows}
    plain_wall = per_k["plain loop of forwards"][0]
    print("\n| method | questions timed | s per 1,000 questions (wall) | CPU s per 1,000 | "
          "speed-up vs plain loop (wall) |\n|---|---|---|---|---|")
    for name, _, _, q in rows:
        w, c = per_k[name]
        print(f"| {name} | {q} | {w:.1f} | {c:.1f} | {plain_wall / w:.1f}x |")
    for scoring, values in scores.items():
        gap = max(abs(a - b) for a, b in zip(values, reference, strict=False))
        print(f"max |log-likelihood {scoring} - plain loop| over {len(reference)} requests: "
              f"{gap:.2e}")


if __name__ == "__main__":
    main()
