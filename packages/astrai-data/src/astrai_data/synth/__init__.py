"""The synthetic bilingual corpus (`astrai data synth`) and the rewards that check it."""

from astrai_data.synth.corpus import NUMERIC as NUMERIC_TASKS
from astrai_data.synth.corpus import VERIFIABLE as VERIFIABLE_TASKS
from astrai_data.synth.rewards import (
    exact_answer_reward,
    extract_answer,
    format_reward,
)
from astrai_data.synth.writer import DEFAULT_SIZE, SynthReport, synthesize, task_spec

__all__ = [
    "DEFAULT_SIZE",
    "NUMERIC_TASKS",
    "VERIFIABLE_TASKS",
    "SynthReport",
    "exact_answer_reward",
    "extract_answer",
    "format_reward",
    "synthesize",
    "task_spec",
]
