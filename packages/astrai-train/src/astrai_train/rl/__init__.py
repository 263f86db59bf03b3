"""Online reinforcement learning: rollouts from the live policy through astrai-serve (the
optional `astrai-train[rl]` extra) and reward functions."""

from astrai_train.rl.extra import INSTALL_HINT, require_serve
from astrai_train.rl.rewards import BUILTIN_REWARDS, MeanReward, build_reward, load_reward
from astrai_train.rl.rollout import EngineRolloutSource, Rollout, RolloutConfig

__all__ = ["BUILTIN_REWARDS", "INSTALL_HINT", "EngineRolloutSource", "MeanReward", "Rollout",
           "RolloutConfig", "build_reward", "load_reward", "require_serve"]
