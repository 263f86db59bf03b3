"""Log-likelihoods straight from the model: what multiple-choice tasks, perplexity and the
lm-eval adapter's `loglikelihood` / `loglikelihood_rolling` score.

A request is a context and a continuation (token ids); its score is the summed log-probability
of the continuation given the context, and whether greedy decoding would have produced it.

Multiple-choice questions ask the same context several times, once per answer. `score_requests`
computes each distinct context once: one batched forward over the contexts keeps their K/V
(`SharedContextCache`, astrai-core's `PagedCache` seam), the first answer token is read off the
context's last hidden state, and only the answers' remaining tokens run again, batched, against
the kept K/V. `score_rows` is the plain path (every row runs whole), used for rolling windows.

Logits are taken in fp32 only at the positions that predict a scored token, a slice at a time,
so a batch never holds (tokens x vocabulary) floats at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from astrai_core.model.masks import padded_causal_mask

LOGIT_ROWS = 1024  # positions per lm_head slice
DEFAULT_BATCH_TOKENS = 8192  # tokens per forward (contexts plus answers)

Advance = Callable[[int], None]


@dataclass(frozen=True)
class Score:
    logprob: float  # summed log-probability of the scored tokens
    is_greedy: bool  # every scored token is the argmax at its position
    n_tokens: int


def truncate_context(context: Sequence[int], continuation: Sequence[int], max_seq_len: int
                     ) -> list[int]:
    """Keep the context's last tokens so that context + continuation fits the window (the
    harness's convention: context is cut from the left)."""
    if not continuation:
        raise ValueError("a continuation to score must have at least one token")
    if len(continuation) >= max_seq_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context "
                         f"window of {max_seq_len}; raise --max-seq-len or shorten the answers")
    if not context:
        raise ValueError("a context must have at least one token (the prefix token when empty)")
    return list(context[-(max_seq_len - len(continuation)):])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _target_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, dim) predicting targets (N,) -> (fp64 log-probabilities, is-argmax), both (N,)."""
    logps, greedy = [], []
    for start in range(0, hidden.shape[0], LOGIT_ROWS):
        logits = model.lm_head(hidden[start:start + LOGIT_ROWS]).float()
        t = targets[start:start + LOGIT_ROWS]
        logp = logits.log_softmax(-1)
        logps.append(logp.gather(-1, t[:, None]).squeeze(-1).double())
        greedy.append(logits.argmax(-1) == t)
    return torch.cat(logps), torch.cat(greedy)


def _sums(logp: torch.Tensor, greedy: torch.Tensor, counts: Sequence[int]) -> list[Score]:
    out, start = [], 0
    logp_list, greedy_list = logp.tolist(), greedy.tolist()
    for n in counts:
        out.append(Score(float(sum(logp_list[start:start + n])), all(greedy_list[start:start + n]),
                         n))
        start += n
    return out


# -- the plain path: every row whole ---------------------------------------------------------

@torch.inference_mode()
def score_rows(model: nn.Module, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
               batch_tokens: int = DEFAULT_BATCH_TOKENS, advance: Advance | None = None
               ) -> list[Score]:
    """Each row is (input ids, targets): the last len(targets) input positions predict the
    targets. Rows are batched by length (right padding)."""
    for inputs, targets in rows:
        if not 0 < len(targets) <= len(inputs):
            raise ValueError(f"a row of {len(inputs)} inputs cannot score {len(targets)} targets")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[Score | None] = [None] * len(rows)
    device = _device(model)
    i = 0
    while i < len(order):
        width = len(rows[order[i]][0])
        batch = order[i:i + max(1, batch_tokens // width)]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        picks, targets, counts = [], [], []
        for b, r in enumerate(batch):
            inputs, tgt = rows[r]
            ids[b, :len(inputs)] = torch.tensor(list(inputs))
            mask[b, :len(inputs)] = True
            first = len(inputs) - len(tgt)
            picks += [b * width + p for p in range(first, len(inputs))]
            targets += list(tgt)
            counts.append(len(tgt))
        ids, mask = ids.to(device), mask.to(device)
        hidden = model.hidden_states(ids, mask if not bool(mask.all()) else None)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(
            0, torch.tensor(picks, device=device))
        logp, greedy = _target_logprobs(model, hidden, torch.tensor(targets, device=device))
        for r, score in zip(batch, _sums(logp, greedy, counts), strict=True):
            results[r] = score
        if advance is not None:
            advance(len(batch))
        i += len(batch)
    return [s for s in results if s is not None]


def rolling_windows(tokens: Sequence[int], prefix: int, window: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Rows that score every token of a document exactly once, each with as much context as the
    window allows (lm-eval's `loglikelihood_rolling`): the first row is the prefix token and
    the first window - 1 tokens; each later row predicts the next `window` tokens, and the last
    one keeps a full window of inputs but scores only what is left.

    tokens 0..9, window 4: [P 0 1 2] -> 0 1 2 3, [3 4 5 6] -> 4 5 6 7, [5 6 7 8] -> 8 9."""
    if window < 1:
        raise ValueError(f"the window must hold at least one token, got {window}")
    seq = [prefix, *tokens]  # seq[i] predicts seq[i + 1] = tokens[i]
    rows, start = [], 0
    while start < len(tokens):
        end = min(start + window, len(tokens))
        begin = max(0, end - window)
        rows.append((seq[begin:end], list(tokens[start:end])))
        start = end
    return rows


# -- the shared-context path -----------------------------------------------------------------

class SharedContextCache:
    """A `PagedCache` for two forwards over G distinct contexts. First the contexts (G rows,
    right padded to Lc); then, in the same rows, the answers of each context laid side by side
    (A answers of at most T tokens: A * T new tokens per row). One buffer per layer holds both,
    (G, heads, Lc + A * T, dim), so the answer pass attends to its context's K/V where they
    were written: no copy per answer. Each answer token sees the context and the earlier
    tokens of its own answer (a block-diagonal causal mask over the answers)."""

    def __init__(self, valid: torch.Tensor, answers: int, answer_len: int) -> None:
        self.valid = valid  # (G, Lc): real context tokens
        self.context_len = valid.shape[1]
        self.answers, self.answer_len = answers, answer_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self._end = self.context_len  # keys written so far
        # Dense contexts need no mask (plain causal attention); padded ones mask their padding.
        self._mask: torch.Tensor | None = (
            None if bool(valid.all()) else padded_causal_mask(valid, self.context_len))

    def begin_answers(self, new_valid: torch.Tensor) -> None:
        """Switch to the answer pass; new_valid (G, A * T) marks real answer tokens."""
        n = self.answers * self.answer_len
        idx = torch.arange(n, device=new_valid.device)
        same_answer = (idx[:, None] // self.answer_len) == (idx[None, :] // self.answer_len)
        causal = (idx[None, :] % self.answer_len) <= (idx[:, None] % self.answer_len)
        own = same_answer & causal & new_valid[:, None, :]  # (G, n, n)
        own |= torch.eye(n, dtype=torch.bool, device=new_valid.device)  # no empty softmax rows
        context = self.valid[:, None, :].expand(-1, n, -1)  # (G, n, Lc)
        self._mask = torch.cat([context, own], dim=-1)[:, None]  # (G, 1, n, Lc + n)
        self._end = self.context_len + n

    def write(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer_id not in self.k:  # the context pass: make room for the answers too
            total = self.context_len + self.answers * self.answer_len
            self.k[layer_id] = k.new_empty(k.shape[0], k.shape[1], total, k.shape[3])
            self.v[layer_id] = v.new_empty(v.shape[0], v.shape[1], total, v.shape[3])
        start = self._end - k.shape[2]
        self.k[layer_id][:, :, start:self._end] = k
        self.v[layer_id][:, :, start:self._end] = v

    def gather(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_id][:, :, :self._end], self.v[layer_id][:, :, :self._end]

    def attention_mask(self) -> torch.Tensor | None:
        return self._mask


def _pad(seqs: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(seqs), max(width, 1), dtype=torch.long)
    valid = torch.zeros(len(seqs), max(width, 1), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        valid[i, :len(s)] = True
    return ids, valid


@torch.inference_mode()
def _score_group_batch(model: nn.Module, contexts: list[list[int]],
                       answers: list[list[list[int]]]) -> list[list[Score]]:
    """contexts: G distinct contexts; answers[g]: the continuations of context g -> their
    scores, in the same nesting."""
    device = _device(model)
    lengths = [len(c) for c in contexts]
    width = max(len(a) - 1 for group in answers for a in group)  # tokens fed per answer
    n_answers = max(len(group) for group in answers)
    ids, valid = _pad(contexts, max(lengths))
    ids, valid = ids.to(device), valid.to(device)
    cache = SharedContextCache(valid, n_answers, width)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    hidden = model.hidden_states(ids, paged_cache=cache, position_ids=positions)  # (G, Lc, dim)
    rows = torch.arange(len(contexts), device=device)
    last = hidden[rows, torch.tensor(lengths, device=device) - 1]  # (G, dim): predicts 1st tokens
    pieces, targets = [], []
    flat_answers = [(g, a) for g, group in enumerate(answers) for a in group]
    pieces.append(last.index_select(0, torch.tensor([g for g, _ in flat_answers], device=device)))
    targets += [a[0] for _, a in flat_answers]
    if width > 0:
        # Row g holds its answers side by side, each padded to `width` tokens (all but the last
        # token of each answer: those predict the next ones).
        fed = [[t for a in group for t in (a[:-1] + [0] * (width - len(a) + 1))]
               + [0] * (width * (n_answers - len(group))) for group in answers]
        real = [[j < len(a) - 1 for a in group for j in range(width)]
                + [False] * (width * (n_answers - len(group))) for group in answers]
        new_ids = torch.tensor(fed, dtype=torch.long, device=device)
        new_valid = torch.tensor(real, dtype=torch.bool, device=device)
        cache.begin_answers(new_valid)
        offsets = torch.arange(width, device=device).repeat(n_answers)
        positions = torch.tensor(lengths, device=device)[:, None] + offsets[None]
        tail = model.hidden_states(new_ids, paged_cache=cache, position_ids=positions)
        flat = tail.reshape(-1, tail.shape[-1])  # (G * A * T, dim)
        picks = [(g * n_answers + i) * width + j for g, group in enumerate(answers)
                 for i, a in enumerate(group) for j in range(len(a) - 1)]
        pieces.append(flat.index_select(0, torch.tensor(picks, dtype=torch.long, device=device)))
        targets += [t for _, a in flat_answers for t in a[1:]]
    logp, greedy = _target_logprobs(model, torch.cat(pieces), torch.tensor(targets, device=device))
    # Scored tokens are laid out: every answer's first token, then the rest answer by answer.
    n = len(flat_answers)
    firsts_lp, firsts_g = logp[:n].tolist(), greedy[:n].tolist()
    tail_lp, tail_g = logp[n:].tolist(), greedy[n:].tolist()
    out: list[list[Score]] = [[] for _ in answers]
    offset = 0
    for i, (g, a) in enumerate(flat_answers):
        k = len(a) - 1
        lp = firsts_lp[i] + sum(tail_lp[offset:offset + k])
        ok = firsts_g[i] and all(tail_g[offset:offset + k])
        offset += k
        out[g].append(Score(float(lp), bool(ok), len(a)))
    return out


def score_requests(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   max_seq_len: int, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                   advance: Advance | None = None) -> list[Score]:
    """Score (context, continuation) pairs, computing each distinct context once. Contexts
    longer than the window lose their first tokens."""
    prepared = [(tuple(truncate_context(c, k, max_seq_len)), list(k)) for c, k in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(prepared):
        groups.setdefault(context, []).append(i)
    ordered = sorted(groups.items(), key=lambda item: -len(item[0]))  # similar lengths together
    results: list[Score | None] = [None] * len(prepared)
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    cost = 0
    for context, members in ordered:
        # tokens this group adds: its context plus each answer's tokens after the first
        group_cost = len(context) + len(members) * max(len(prepared[i][1]) - 1 for i in members)
        if batch and cost + group_cost > batch_tokens:
            _run_batch(model, prepared, batch, results, advance)
            batch, cost = [], 0
        batch.append((context, members))
        cost += group_cost
    if batch:
        _run_batch(model, prepared, batch, results, advance)
    return [s for s in results if s is not None]


def _run_batch(model: nn.Module, prepared: list[tuple[tuple[int, ...], list[int]]],
               batch: list[tuple[tuple[int, ...], list[int]]], results: list[Score | None],
               advance: Advance | None) -> None:
    contexts = [list(context) for context, _ in batch]
    answers = [[prepared[i][1] for i in members] for _, members in batch]
    scored = _score_group_batch(model, contexts, answers)
    for (_, members), scores in zip(batch, scored, strict=True):
        for i, score in zip(members, scores, strict=True):
            results[i] = score
    if advance is not None:
        advance(sum(len(members) for _, members in batch))
