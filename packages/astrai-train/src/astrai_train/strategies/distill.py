"""Knowledge distillation (Hinton et al., 2015): the student learns the teacher's next-token
distribution on SEQ or SFT data,

    L = (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T) + alpha * CE(student, labels)

per token (p^T: the softmax of logits / T; the T^2 keeps the gradient's scale independent of
T), averaged over the tokens that count: all of them on SEQ data, the assistant tokens
(`loss_mask`) on SFT data.

Neither model's logits over the vocabulary exist for the whole batch at once: the teacher runs
in inference mode up to its final hidden states, and each chunk of tokens goes through both
output projections, into the loss and, right away, into the student's gradients (as
`linear_ce.py` does for cross entropy). Teacher and student share the tokenizer (checked by
`load_teacher`); they may differ in every other dimension.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from astrai_train.strategies.base import BaseStrategy, Batch
from astrai_train.strategies.factory import StrategyFactory
from astrai_train.strategies.linear_ce import CHUNK_ELEMENTS, split_lm_head

TOKENIZER_FILE = "tokenizer.json"


def load_teacher(folder: str | Path, student_tokenizer: str | Path | None) -> nn.Module:
    """The teacher model of `folder` in fp32, frozen and in eval mode, after checking that its
    tokenizer is the student's (the same vocabulary, merges and special tokens)."""
    from astrai_core import AutoModel, AutoTokenizer

    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        raise ValueError(f"--teacher {folder} has no {TOKENIZER_FILE}: distillation needs the "
                         "teacher's tokenizer to check that it is the student's; copy it in")
    if student_tokenizer is None:
        raise ValueError("--strategy distill needs the student's tokenizer to check it against "
                         "the teacher's: pass --tokenizer DIR, or a --model folder that has one")
    teacher_fp = AutoTokenizer.from_pretrained(folder).fingerprint()
    student_fp = AutoTokenizer.from_pretrained(student_tokenizer).fingerprint()
    if teacher_fp != student_fp:
        raise ValueError(f"the teacher ({folder}) and the student ({student_tokenizer}) use "
                         "different tokenizers, so their next-token distributions are over "
                         "different tokens and cannot be compared; distill from a teacher "
                         "trained with the student's tokenizer")
    teacher = AutoModel.from_pretrained(folder, dtype="float32")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class _LinearDistill(torch.autograd.Function):
    """sum_i w_i [(1 - alpha) T^2 KL_i + alpha CE_i] over rows of hidden states, chunked; the
    student's gradients are computed in forward, chunk by chunk, and only they are kept."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor,
                temperature: float, alpha: float, vocab: int, needs_grad: bool) -> torch.Tensor:
        N = hidden.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        acc = torch.promote_types(weight.dtype, torch.float32)
        total, kl_total, ce_total = (torch.zeros((), dtype=acc, device=hidden.device)
                                     for _ in range(3))
        w_s, w_t = weight[:vocab], teacher_weight[:vocab]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if needs_grad else None
        T = temperature
        for start in range(0, N, chunk):
            h, w = hidden[start:start + chunk], row_weights[start:start + chunk]
            y = labels[start:start + chunk]
            logits = F.linear(h, w_s).to(acc)  # (c, V)
            log_p = F.log_softmax(F.linear(teacher_hidden[start:start + chunk], w_t).to(acc) / T, -1)
            log_q = F.log_softmax(logits / T, -1)
            p = log_p.exp()
            kl = (p * (log_p - log_q)).sum(-1)  # (c,)
            loss = (1 - alpha) * T * T * kl
            ce = None
            if alpha:
                log_s = F.log_softmax(logits, -1)
                ce = -log_s.gather(1, y[:, None])[:, 0]
                loss = loss + alpha * ce
                ce_total += (ce * w).sum()
            total += (loss * w).sum()
            kl_total += (kl * w).sum()
            if needs_grad:
                # d/d logits: (1 - alpha) T (q - p) + alpha (softmax(logits) - onehot(y)).
                grad = log_q.exp_().sub_(p).mul_((1 - alpha) * T)
                if alpha:
                    grad.add_(log_s.exp_().mul_(alpha))
                    grad.scatter_add_(1, y[:, None], grad.new_full((len(y), 1), -alpha))
                grad = grad.mul_(w[:, None]).to(weight.dtype)
                grad_hidden[start:start + chunk] = grad @ w_s
                grad_weight[:vocab] += (grad.t() @ h.to(grad.dtype)).to(acc)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(kl_total, ce_total)
        return total, kl_total, ce_total

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss, grad_weight * grad_loss) + (None,) * 8


def distill_loss(student_logits: torch.Tensor, teacher_hidden: torch.Tensor,
                 teacher_weight: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor,
                 temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same sums from the student's logits (N, V) through autograd, the teacher's still
    chunk by chunk: the path for students whose forward cannot be split before the output head
    (a wrapper, a compiled or sharded model)."""
    V = student_logits.shape[-1]
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    chunk = max(1, CHUNK_ELEMENTS // V)
    totals = []
    for start in range(0, student_logits.shape[0], chunk):
        s = student_logits[start:start + chunk].to(acc)
        w, y = row_weights[start:start + chunk].to(acc), labels[start:start + chunk]
        with torch.no_grad():
            t = F.linear(teacher_hidden[start:start + chunk], teacher_weight[:V]).to(acc)
            log_p = F.log_softmax(t / temperature, -1)
        kl = (log_p.exp() * (log_p - F.log_softmax(s / temperature, -1))).sum(-1)
        ce = F.cross_entropy(s, y, reduction="none") if alpha else torch.zeros_like(kl)
        loss = (1 - alpha) * temperature ** 2 * kl + alpha * ce
        totals.append(torch.stack([(loss * w).sum(), (kl * w).sum(), (ce * w).sum()]))
    loss, kl, ce = torch.stack(totals).sum(0)
    return loss, kl.detach(), ce.detach()


@StrategyFactory.register("distill")
class DistillStrategy(BaseStrategy):
    """Forward KL to a frozen teacher at `temperature`, mixed with `alpha` times the hard-label
    cross entropy, on SEQ batches (every token) or SFT batches (the `loss_mask` tokens)."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu",
                 teacher: nn.Module | None = None, temperature: float = 1.0,
                 alpha: float = 0.0) -> None:
        super().__init__(model, device)
        if teacher is None:
            raise ValueError("--strategy distill needs a teacher: --teacher DIR (a model folder "
                             "with the student's tokenizer)")
        if not temperature > 0:
            raise ValueError(f"distill temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill alpha must be in [0, 1], got {alpha}")
        teacher_split = split_lm_head(teacher)
        if teacher_split is None:
            raise ValueError("the teacher must be a plain AstrAI Transformer (not wrapped or "
                             "compiled): its output head runs chunk by chunk")
        self.teacher, self.temperature, self.alpha = teacher, float(temperature), float(alpha)
        self.vocab = self._shared_vocab(model, teacher)

    @staticmethod
    def _shared_vocab(student: nn.Module, teacher: nn.Module) -> int:
        """Both heads score the same ids; a padded head (more rows than the tokenizer has
        tokens) is cut to the other's size, padding ids never appear in data."""
        vs, vt = student.config.vocab_size, teacher.config.vocab_size
        return min(vs, vt)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        ids, labels = batch["input_ids"], batch["labels"]
        if "loss_mask" in batch:  # SFT: the assistant tokens; a window without any weighs 0
            mask = batch["loss_mask"].double()
            weights = mask / mask.sum().clamp(min=1)
        else:
            weights = torch.full(labels.shape, 1.0 / labels.numel(), dtype=torch.float64,
                                 device=labels.device)
        if int(labels.max()) >= self.vocab:
            raise ValueError(f"a label id ({int(labels.max())}) is beyond the vocabulary both "
                             f"models score ({self.vocab}); the data was tokenized with "
                             "another tokenizer")
        with torch.inference_mode():  # the teacher: no graph, no saved activations
            teacher_hidden = self.teacher.hidden_states(ids).flatten(0, 1)
        teacher_weight = self.teacher.lm_head.weight
        split = split_lm_head(self.model)
        flat_w = weights.flatten()
        if split is not None:
            hidden_states, weight = split
            hidden = hidden_states(ids).flatten(0, 1)
            needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
            loss, kl, ce = _LinearDistill.apply(
                hidden, weight, teacher_hidden, teacher_weight, labels.flatten(),
                flat_w.to(torch.promote_types(weight.dtype, torch.float32)), self.temperature,
                self.alpha, self.vocab, needs_grad)
        else:
            student = self.model(ids).flatten(0, 1)[:, :self.vocab]
            loss, kl, ce = distill_loss(student, teacher_hidden, teacher_weight, labels.flatten(),
                                        flat_w, self.temperature, self.alpha)
        self.metrics = {"kl": kl}  # weighted means over the tokens, detached
        if self.alpha:
            self.metrics["ce"] = ce
        return loss

    def loss_weight(self, batch: Batch) -> float:
        if "loss_mask" in batch:
            return float(batch["loss_mask"].sum())
        return float(batch["labels"].numel())

    def reference_models(self) -> list[nn.Module]:
        return [self.teacher]
