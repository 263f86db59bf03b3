"""Pieces of the quickstart that need no training: plans, scoring and the tables."""

from __future__ import annotations

from astrai_train.evaluation import HeldOutScores, mean_by_lang, reply_is_correct
from astrai_train.quickstart import DEFAULT_PLANS, QuickstartConfig
from astrai_train.quickstart.report import markdown_table


def test_steps_scale_keeps_at_least_one_step_and_shrinks_warmup():
    plan = DEFAULT_PLANS["pretrain"].scaled(0.001)
    assert plan.steps == 1 and plan.warmup_steps == 0
    assert DEFAULT_PLANS["pretrain"].scaled(2.0).steps == 2 * DEFAULT_PLANS["pretrain"].steps


def test_fingerprint_changes_with_the_seed():
    assert QuickstartConfig(seed=1).fingerprint() != QuickstartConfig(seed=2).fingerprint()


def test_numeric_replies_are_checked_by_value_and_facts_by_text():
    assert reply_is_correct("3 + 4 = 7.", "3 + 4 = 7.", "arithmetic")
    assert reply_is_correct("3 加 4 等于 7。", "3 加 4 等于 7。", "arithmetic")
    assert not reply_is_correct("3 + 4 = 8.", "3 + 4 = 7.", "arithmetic")
    assert reply_is_correct(" Snow is white. ", "Snow is white.", "color")
    assert not reply_is_correct("Snow is black.", "Snow is white.", "color")


def test_means_are_per_language():
    assert mean_by_lang([1.0, 0.0, 1.0], ["en", "en", "zh"]) == {"en": 0.5, "zh": 1.0}


def test_markdown_table_has_a_row_per_stage():
    rows = [HeldOutScores("sft", loss={"en": 0.5, "zh": 1.0}, accuracy={"en": 0.25, "zh": 0.5},
                          preference={"en": 0.75}, margin={"en": 0.0, "zh": 0.0},
                          reward={"en": 0.1})]
    text = markdown_table(rows)
    assert "| sft | 0.500 | 1.000 | 25.0% | 50.0% | 75.0% | - | 0.00 | 0.00 | 0.100 | - |" in text
    assert text.splitlines()[0].startswith("| stage | loss en | loss zh | accuracy en")


def test_only_a_dpo_stage_after_another_samples_on_policy_pairs():
    import dataclasses

    import pytest

    plans = dict(DEFAULT_PLANS)
    plans["sft"] = dataclasses.replace(plans["sft"], on_policy_samples=4)
    with pytest.raises(ValueError, match="the sft stage samples on-policy pairs"):
        QuickstartConfig(plans=plans)
    plans = dict(DEFAULT_PLANS, dpo=dataclasses.replace(DEFAULT_PLANS["dpo"], on_policy_samples=2))
    assert QuickstartConfig(plans=plans).fingerprint()["plans"]["dpo"]["on_policy_samples"] == 2
