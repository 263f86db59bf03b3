"""`astrai quickstart`: corpus, tokenizer, pretraining, SFT, DPO and online GRPO of a bilingual
chat model on a CPU, evaluated on the held-out split (needs the `rl` extra: astrai-serve)."""

from astrai_train.quickstart.config import DEFAULT_PLANS, QuickstartConfig, StagePlan

__all__ = ["DEFAULT_PLANS", "QuickstartConfig", "StagePlan"]
