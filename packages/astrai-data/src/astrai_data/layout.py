"""Names of the streams, record arrays and texts each dataset kind stores.

Preprocessing writes these and the datasets read them; keeping them in one place keeps the two
sides in step.
"""

from __future__ import annotations

SEQ_KEYS = ["sequence"]
SFT_KEYS = ["sequence", "loss_mask"]

# DPO: prompt + chosen and prompt + rejected, each a record in its own stream pair.
DPO_KEYS = ["chosen", "chosen_mask", "rejected", "rejected_mask"]
DPO_LENGTHS = {"chosen": "chosen_lengths", "rejected": "rejected_lengths"}

# GRPO offline: G sequences (prompt + response g) per record; lengths and rewards are (N, G).
GRPO_KEYS = ["sequence", "loss_mask"]
GRPO_LENGTHS = "lengths"
GRPO_REWARDS = "rewards"

# GRPO online: the rendered prompt only, plus the texts a reward function needs.
GRPO_ONLINE_KEYS = ["prompt"]
GRPO_PROMPT_LENGTHS = "prompt_lengths"
GRPO_TEXTS = ["prompt", "answer", "lang", "messages"]

GRPO_MODE = "grpo_mode"  # info key: "offline" or "online"
