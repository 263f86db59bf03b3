"""Sampling: per-request `SamplingParams`, the seed's logit strategies, and `SamplingPipeline`,
which applies them to a whole batch at once with one value per row.

Order (as in Hugging Face and vLLM): penalties, temperature, top-k, top-p, min-p, then a draw.
A row with temperature 0 is greedy: the argmax after penalties. The draw inverts the
cumulative distribution with one uniform number per row (an exponential race or
`torch.multinomial` spends a transcendental per vocabulary entry: 20x slower on CPU), and a
seeded row draws its number from its own generator, so a seed fixes the output whatever else
shares the batch.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

NEG_INF = float("-inf")


class TokenMatcher(Protocol):
    """One request's state in a grammar (astrai_serve.constrained.GrammarMatcher): which tokens
    may come next, advanced by the scheduler with each token the request accepts."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set bit t of int32 word t // 32 of `bitmask[row]` iff token t may come next. (A
        matcher class may also offer `fill_bitmasks(matchers, bitmask)`, filling rows
        0..len - 1 at once; the mask step then calls that.)"""

    def accept(self, token_id: int) -> None: ...

    @property
    def done(self) -> bool:
        """Nothing but a stop token could follow: the request is complete."""


class GrammarSpec(Protocol):
    """A compiled grammar (astrai_serve.constrained.Grammar): a fresh matcher per request."""

    def matcher(self) -> TokenMatcher: ...


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops."""

    max_tokens: int = 256  # new tokens at most (the context window may end it sooner)
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # >1 discourages any token already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # same seed, same output
    stop: list[str] = field(default_factory=list)  # stop strings, trimmed from the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens
    ignore_eos: bool = False  # keep going past the tokenizer's end-of-sequence tokens
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: plus the top N
    grammar: GrammarSpec | None = None  # constrain the output to this grammar (JSON schema, ...)
    adapter: str | None = None  # the served LoRA adapter to generate with; None: the base model

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (all(s for s in self.stop), "stop strings must not be empty"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")

    def for_sample(self, i: int) -> SamplingParams:
        """The params of sample `i` of an n-sample request. The one rule for seeds: sample i
        of a request with seed s uses seed s + i, so the n samples differ from each other
        and each is reproducible (and sample 0 equals the same request with n = 1)."""
        if self.seed is None or i == 0:
            return self
        return dataclasses.replace(self, seed=self.seed + i)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)


def _column(values: Sequence[float | int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]  # (B, 1)


class BaseSamplingStrategy(ABC):
    """One logit transformation over a batch (B, V); rows it does not concern pass unchanged."""

    @abstractmethod
    def apply(self, logits: torch.Tensor, filter_value: float = NEG_INF) -> torch.Tensor: ...


class TemperatureStrategy(BaseSamplingStrategy):
    def __init__(self, temperature: float | Sequence[float]) -> None:
        temps = [temperature] if isinstance(temperature, int | float) else list(temperature)
        self.temperature = [t if t > 0 else 1.0 for t in temps]  # greedy rows are argmax'ed anyway

    def apply(self, logits: torch.Tensor, filter_value: float = NEG_INF) -> torch.Tensor:
        return logits / _column(self.temperature, logits)


class TopKStrategy(BaseSamplingStrategy):
    def __init__(self, top_k: int | Sequence[int]) -> None:
        self.top_k = [top_k] if isinstance(top_k, int) else list(top_k)

    def apply(self, logits: torch.Tensor, filter_value: float = NEG_INF) -> torch.Tensor:
        V = logits.shape[-1]
        k = [min(k, V) if k > 0 else V for k in self.top_k]
        kmax = max(k)
        top = logits.topk(kmax, dim=-1).values  # (B, kmax), descending
        index = torch.tensor(k, device=logits.device)[:, None] - 1
        threshold = top.gather(-1, index.expand(logits.shape[0], 1))  # each row's k-th value
        return logits.masked_fill(logits < threshold, filter_value)


class TopPStrategy(BaseSamplingStrategy):
    def __init__(self, top_p: float | Sequence[float]) -> None:
        self.top_p = [top_p] if isinstance(top_p, int | float) else list(top_p)

    def apply(self, logits: torch.Tensor, filter_value: float = NEG_INF) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass strictly above each token
        drop = before >= _column(self.top_p, probs)  # the first token always survives
        return logits.masked_fill(drop.scatter(-1, order, drop), filter_value)


class MinPStrategy(BaseSamplingStrategy):
    def __init__(self, min_p: float | Sequence[float]) -> None:
        self.min_p = [min_p] if isinstance(min_p, int | float) else list(min_p)

    def apply(self, logits: torch.Tensor, filter_value: float = NEG_INF) -> torch.Tensor:
        probs = logits.softmax(-1)
        floor = probs.amax(-1, keepdim=True) * _column(self.min_p, probs)
        return logits.masked_fill(probs < floor, filter_value)


class TokenMaskStrategy(BaseSamplingStrategy):
    """Grammar-constrained rows keep only the tokens their matcher allows next; free rows pass
    untouched (and a batch without constrained rows never builds this step)."""

    def __init__(self, matchers: Sequence[TokenMatcher | None]) -> None:
        self.rows = [i for i, m in enumerate(matchers) if m is not None]
        self.matchers = [m for m in matchers if m is not None]

    def apply(self, logits: torch.Tensor, filter_value: float = NEG_INF) -> torch.Tensor:
        V = logits.shape[-1]
        bitmask = torch.zeros(len(self.rows), (V + 31) // 32, dtype=torch.int32)
        kinds = {type(m) for m in self.matchers}
        fill_all = getattr(kinds.pop(), "fill_bitmasks", None) if len(kinds) == 1 else None
        if fill_all is not None:  # one kind of matcher that fills all its rows at once
            fill_all(self.matchers, bitmask)
        else:
            for j, matcher in enumerate(self.matchers):
                matcher.fill_bitmask(bitmask, j)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
        allowed = torch.from_numpy(bits[:, :V]).to(logits.device, torch.bool)  # (R, V)
        index = torch.tensor(self.rows, device=logits.device)
        masked = logits.index_select(0, index).masked_fill(~allowed, filter_value)
        return logits.index_copy(0, index, masked)


class PenaltyStrategy(BaseSamplingStrategy):
    """Repetition penalty (Hugging Face's: over prompt and output, divide positive logits and
    multiply negative ones) and presence / frequency penalties (OpenAI's: over the output)."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
    ) -> None:
        self.params, self.prompts, self.outputs = params, prompts, outputs

    def apply(self, logits: torch.Tensor, filter_value: float = NEG_INF) -> torch.Tensor:
        B, V = logits.shape
        counts = self._counts(self.outputs, B, V, logits.device)
        seen = self._counts(self.prompts, B, V, logits.device).bool() | (counts > 0)
        rep = _column([p.repetition_penalty for p in self.params], logits)
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        presence = _column([p.presence_penalty for p in self.params], logits)
        frequency = _column([p.frequency_penalty for p in self.params], logits)
        return logits - presence * (counts > 0) - frequency * counts

    def _counts(self, rows: Sequence[Sequence[int]], B: int, V: int, device) -> torch.Tensor:
        counts = torch.zeros(B, V, device=device)
        used = [(b, ids) for b, ids in enumerate(rows) if ids and self.params[b].needs_penalties]
        if used:
            row = torch.tensor([b for b, ids in used for _ in ids], device=device)
            tok = torch.tensor([t for _, ids in used for t in ids], device=device)
            counts.index_put_((row, tok), torch.ones(len(tok), device=device), accumulate=True)
        return counts


class SamplingPipeline:
    """Strategies applied in order, then one draw per row."""

    def __init__(self, strategies: Sequence[BaseSamplingStrategy] = (), greedy: Sequence[bool] = ()) -> None:
        self.strategies = list(strategies)
        self.greedy = list(greedy)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]] = (),
        outputs: Sequence[Sequence[int]] = (),
        matchers: Sequence[TokenMatcher | None] = (),
    ) -> SamplingPipeline:
        """Only the strategies some row needs; `prompts`/`outputs` feed the penalties and
        `matchers` (one per row, None for a free row) the grammar mask, which comes first."""
        strategies: list[BaseSamplingStrategy] = []
        if any(m is not None for m in matchers):
            strategies.append(TokenMaskStrategy(matchers))
        if any(p.needs_penalties for p in params):
            strategies.append(PenaltyStrategy(params, prompts, outputs))
        sampled = [p for p in params if not p.greedy]
        if any(p.temperature != 1 for p in sampled):
            strategies.append(TemperatureStrategy([p.temperature for p in params]))
        if any(p.top_k > 0 for p in sampled):
            strategies.append(TopKStrategy([0 if p.greedy else p.top_k for p in params]))
        if any(p.top_p < 1 for p in sampled):
            strategies.append(TopPStrategy([1.0 if p.greedy else p.top_p for p in params]))
        if any(p.min_p > 0 for p in sampled):
            strategies.append(MinPStrategy([0.0 if p.greedy else p.min_p for p in params]))
        return cls(strategies, [p.greedy for p in params])

    def apply(self, logits: torch.Tensor, filter_value: float = NEG_INF) -> torch.Tensor:
        for strategy in self.strategies:
            logits = strategy.apply(logits, filter_value)
        return logits

    def sample(
        self,
        logits: torch.Tensor,
        generators: Sequence[torch.Generator | None] = (),
        filter_value: float = NEG_INF,
    ) -> torch.Tensor:
        """(B, V) logits -> (B,) token ids."""
        logits = logits.float()
        # The grammar mask and penalties apply to greedy rows too; the rest shape the draw.
        first = (TokenMaskStrategy, PenaltyStrategy)
        penalties = [s for s in self.strategies if isinstance(s, first)]
        shaping = [s for s in self.strategies if not isinstance(s, first)]
        for strategy in penalties:
            logits = strategy.apply(logits, filter_value)
        greedy = self.greedy or [False] * logits.shape[0]
        if all(greedy):
            return logits.argmax(-1)
        processed = logits
        for strategy in shaping:
            processed = strategy.apply(processed, filter_value)
        drawn = self._draw(processed.softmax(-1), generators)
        if not any(greedy):
            return drawn
        return torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(-1), drawn)

    @staticmethod
    def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """One token per row with probability `probs`: the first index whose cumulative
        probability exceeds a uniform draw (filtered tokens add nothing, so never qualify)."""
        cdf = probs.double().cumsum(-1)  # fp64: 100k fp32 additions would drift
        u = torch.rand(probs.shape[0], 1, dtype=cdf.dtype, device=probs.device)
        for row, gen in enumerate(generators):
            if gen is not None:
                u[row] = torch.rand(1, dtype=cdf.dtype, device=probs.device, generator=gen)
        index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        return index.squeeze(-1).clamp_max_(probs.shape[-1] - 1)


def compute_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, top_n: Sequence[int | None]
) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per row: the model's log-probability of the chosen token and its `top_n` most likely
    tokens, from the raw logits (before penalties, temperature and filters)."""
    rows = [i for i, n in enumerate(top_n) if n is not None]
    out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(top_n)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logp = logits.index_select(0, index).float().log_softmax(-1)
    chosen_lp = logp.gather(-1, chosen.index_select(0, index)[:, None]).squeeze(-1).tolist()
    n_max = max(int(top_n[i] or 0) for i in rows)
    top = logp.topk(n_max, dim=-1) if n_max else None
    for j, i in enumerate(rows):
        n = int(top_n[i] or 0)
        pairs = []
        if top is not None and n:
            pairs = list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist(), strict=True))
        out[i] = (chosen_lp[j], pairs)
    return out
