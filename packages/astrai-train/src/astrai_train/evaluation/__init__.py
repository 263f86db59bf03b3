"""Evaluation: `astrai eval` (lm-evaluation-harness tasks through the `astrai` adapter,
perplexity and bits per byte, and the held-out scoring on the synthetic corpus that the
quickstart's table uses). The lm-eval adapter lives in `astrai_train.evaluation.lm_eval_adapter`
and needs the eval extra; nothing here imports lm-eval."""

from astrai_train.evaluation.heldout import (
    LANGS,
    HeldOutScores,
    HeldOutSet,
    chat_accuracy,
    greedy_replies,
    mean_by_lang,
    mean_reward,
    preference_gaps,
    preference_scores,
    read_jsonl,
    reply_is_correct,
    reply_loss,
    score_model,
)
from astrai_train.evaluation.models import EvalModel, load_eval_model
from astrai_train.evaluation.perplexity import PerplexityTask, perplexity
from astrai_train.evaluation.results import EvalReport, ModelResult, ScoreRow, results_table
from astrai_train.evaluation.runner import EvalOptions, evaluate_model, prepare_tasks, run_eval
from astrai_train.evaluation.scoring import Score, rolling_windows, score_requests, score_rows
from astrai_train.evaluation.tasks import EvalTaskFactory, HeldOutTask, TaskOptions, build_tasks

__all__ = [
    "LANGS", "EvalModel", "EvalOptions", "EvalReport", "EvalTaskFactory", "HeldOutScores",
    "HeldOutSet", "HeldOutTask", "ModelResult", "PerplexityTask", "Score", "ScoreRow",
    "TaskOptions", "build_tasks", "chat_accuracy", "evaluate_model", "greedy_replies",
    "load_eval_model", "mean_by_lang", "mean_reward", "perplexity", "preference_gaps",
    "preference_scores",
    "prepare_tasks", "read_jsonl", "reply_is_correct", "reply_loss", "results_table",
    "rolling_windows", "run_eval", "score_model", "score_requests", "score_rows",
]
