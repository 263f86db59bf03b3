"""Training strategies: one loss per train type, created by name through `StrategyFactory`."""

from astrai_train.strategies.base import BaseStrategy, frozen_copy
from astrai_train.strategies.dpo import DPOStrategy
from astrai_train.strategies.factory import StrategyFactory
from astrai_train.strategies.grpo import GRPOStrategy, RolloutSource, group_advantages
from astrai_train.strategies.logprobs import sequence_log_probs, token_log_probs
from astrai_train.strategies.seq import SEQStrategy
from astrai_train.strategies.sft import SFTStrategy

__all__ = [
    "BaseStrategy", "DPOStrategy", "GRPOStrategy", "RolloutSource", "SEQStrategy", "SFTStrategy",
    "StrategyFactory", "frozen_copy", "group_advantages", "sequence_log_probs", "token_log_probs",
]
