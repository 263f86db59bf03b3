"""Log-likelihoods through the serving engine: the context is the prompt, and the continuation
is forced as the "generated" tokens by a one-path grammar (`ForcedTokens`). The engine reports
each generated token's log-probability from the raw logits (before any mask), so a forced,
greedy request returns exactly log p(continuation | context); with logprobs=1 it also reports
the unmasked argmax, which says whether greedy decoding would have produced the continuation.

Answers that share a context share the prompt, so the engine's prefix cache serves it: the
first request of each context goes first, and the others enter once that one has computed the
prompt (its pages are indexed then), reading all its full pages from the cache.

astrai-serve offers no prompt log-probabilities through `InferenceEngine` (the HTTP API's
echo scoring runs its own forward); forcing the answer is how the engine itself scores it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from astrai_train.evaluation.scoring import Advance, Score, truncate_context

WAVE = 64  # contexts whose first answers run before their other answers are queued


class ForcedTokens:
    """A grammar with one path: exactly `tokens`, in order (astrai-serve's `GrammarSpec`)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = [int(t) for t in tokens]

    def matcher(self) -> _ForcedMatcher:
        return _ForcedMatcher(self.tokens)


class _ForcedMatcher:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.position = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        token = self.tokens[min(self.position, len(self.tokens) - 1)]
        bit = token % 32
        # int32 words: bit 31 is the sign bit
        bitmask[row, token // 32] = (1 << bit) if bit < 31 else -(1 << 31)

    def accept(self, token_id: int) -> None:
        self.position += 1

    @property
    def done(self) -> bool:
        return self.position >= len(self.tokens)


def _params(continuation: Sequence[int]):
    from astrai_serve import SamplingParams

    return SamplingParams(max_tokens=len(continuation), temperature=0.0, logprobs=1,
                          ignore_eos=True, grammar=ForcedTokens(continuation))


def _score(result) -> Score:
    logprobs = result.logprobs
    return Score(float(sum(lp.logprob for lp in logprobs)),
                 all(lp.top and lp.top[0][0] == lp.token_id for lp in logprobs), len(logprobs))


def score_with_engine(engine, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      advance: Advance | None = None, wave: int = WAVE) -> list[Score]:
    """Score (context, continuation) pairs as forced generations on `engine` (an astrai-serve
    `InferenceEngine` with the prefix cache on, for the sharing to pay)."""
    prepared = [(tuple(truncate_context(c, k, engine.max_seq_len)), list(k)) for c, k in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(prepared):
        groups.setdefault(context, []).append(i)
    members = list(groups.values())
    results: list = [None] * len(prepared)

    def submit(indices: list[int]) -> None:
        handles = engine.submit_many([list(prepared[i][0]) for i in indices],
                                     [_params(prepared[i][1]) for i in indices])
        for i, handle in zip(indices, handles, strict=True):
            results[i] = handle

    pending: list[int] = []
    for start in range(0, len(members), wave):
        chunk = members[start:start + wave]
        firsts = [m[0] for m in chunk]
        submit(firsts)
        for i in firsts:  # the prompt's pages are cached once its first token exists
            results[i].wait_first_token()
        rest = [i for m in chunk for i in m[1:]]
        submit(rest)
        pending += firsts + rest
        pending = _collect_done(pending, results, advance)
    scores: list[Score | None] = [None] * len(prepared)
    for i in range(len(prepared)):
        scores[i] = _score(results[i].wait_completion())
    if advance is not None and pending:
        advance(len(pending))
    return [s for s in scores if s is not None]


def _collect_done(pending: list[int], results: list, advance: Advance | None) -> list[int]:
    """Advance the progress for finished requests; return the unfinished ones."""
    done = [i for i in pending if results[i].done]
    if advance is not None and done:
        advance(len(done))
    return [i for i in pending if not results[i].done]
