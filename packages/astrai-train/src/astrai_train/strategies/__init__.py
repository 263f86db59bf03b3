"""Training strategies: one loss per strategy, created by name through `StrategyFactory`."""

from astrai_train.strategies.base import AdaptersOff, BaseStrategy, frozen_copy, reference_of
from astrai_train.strategies.distill import DistillStrategy, load_teacher
from astrai_train.strategies.dpo import DPOStrategy, preference_pairs
from astrai_train.strategies.factory import StrategyFactory
from astrai_train.strategies.grpo import GRPOStrategy, RolloutSource, group_advantages
from astrai_train.strategies.logprobs import sequence_log_probs, token_log_probs
from astrai_train.strategies.seq import SEQStrategy
from astrai_train.strategies.sft import SFTStrategy

__all__ = [
    "AdaptersOff", "BaseStrategy", "DPOStrategy", "DistillStrategy", "GRPOStrategy",
    "RolloutSource", "SEQStrategy", "SFTStrategy", "StrategyFactory", "frozen_copy",
    "group_advantages", "load_teacher", "preference_pairs", "reference_of", "sequence_log_probs",
    "token_log_probs",
]
