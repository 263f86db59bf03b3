"""`QuickstartConfig` and the plan of each training stage.

The defaults are sized for a 2-core CPU: the whole job (corpus, tokenizer, four training stages,
evaluation) takes about five minutes there. `steps_scale` multiplies every stage's step count,
so `--steps-scale 0.05` is a smoke test and `--steps-scale 4` a longer, better run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "sft", "dpo", "grpo")


@dataclass(frozen=True)
class StagePlan:
    """One training stage: its strategy, data file and optimizer schedule (before scaling)."""

    name: str
    strategy: str
    data: str  # synthetic corpus file (JSONL) the stage's dataset is prepared from
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 0
    max_seq_len: int | None = None
    values: dict[str, Any] = field(default_factory=dict)  # other TrainConfig fields
    # DPO: sample this many replies per prompt from the previous stage's model and add a pair
    # of the chosen reply against its most frequent wrong one (astrai_train.rl.pairs); 0: off
    on_policy_samples: int = 0

    def scaled(self, scale: float) -> StagePlan:
        steps = max(1, round(self.steps * scale))
        return dataclasses.replace(self, steps=steps, warmup_steps=min(self.warmup_steps, steps // 5))


# What the five minutes are spent on (docs/benchmarks.md, "Quickstart", has the measurements):
# - a 1M-parameter model (`mini`) that sees ~2.5M tokens beats the 5M `small` that sees 0.7M;
# - Muon for the block matrices: the same steps reach a much lower loss than AdamW
#   (held-out accuracy after SFT, same budget: AdamW 55% en / 25% zh, Muon 86% / 48%);
# - DPO keeps the chosen replies likely (rpo_alpha 2), so it sharpens preferences without
#   making the greedy answers worse. On 2,394 held-out pairs a language, 72 steps at RPO 2
#   raised preference accuracy by 0.25 / 0.29 points, 24 at RPO 1 and 48 at RPO 2 left it a
#   tenth lower; 48 keeps the whole job near 4.5 minutes (72: 5 minutes), and GRPO after it
#   gained more (+2.5 / +2.3 points of accuracy on 798 chats a language, against +1.5 / -0.1);
# - pretrain 380 + SFT 240 steps is what fits five minutes of two cores with the evaluation
#   (800 + 400 reached 86% / 84% but took 7.7 minutes);
# - DPO also on the SFT model's own wrong replies (on_policy_samples 4: the chosen reply
#   against the most frequent wrong one of 4 samples at temperature 1, for the ~60% of prompts
#   that get one; the corpus's pairs stay). The fixed pairs' rejected replies are mostly ones
#   the model never gives; the held-out pairs it ranks wrong are its own confident errors. On
#   798 held-out pairs a language (AMD EPYC Milan, fp32), against the SFT model, six runs
#   (sampling and data-order seeds, 2 / 4 / 8 samples): preference accuracy -0.04 / +1.2 points
#   on average (en -0.75 .. +0.63, zh +0.5 .. +1.75), against -0.46 / +0.37 for three runs of the
#   fixed pairs alone (en fell in all three); replacing the fixed pairs: -0.37 / +0.5. The
#   4,000 samples cost about 11 s; accuracy after DPO 79.7% / 70.3% against 77.3% / 68.7%,
#   which leaves GRPO less to add in English (its 32 steps: -0.7 / +2.0 points that run);
# - GRPO with Muon, as pretraining and SFT: AdamW moves every weight by about the learning rate
#   each step whatever its gradient, so RL's noisy gradients became noise in the weights (at
#   1e-4 or 5e-5 held constant, held-out arithmetic fell by up to 11 points; AdamW 1e-4 constant:
#   -1.3 / -3.5 points, Muon 1e-4 decayed: +2.9 / +1.0, on 798 held-out chats a language).
#   Muon's gain grows with steps (after 72 DPO steps, 5e-5: 40 steps -0.3 / +0.9, 80 steps
#   +2.6 / +0.6); 64 fit the budget, with the rollouts' second forward gone (GRPOStrategy:
#   the ratio's denominator).
#   Advantages unscaled (Dr. GRPO): scaled by the group std, 40 steps swung arithmetic by up
#   to 10 points either way (docs/benchmarks.md has every probe).
# - GRPO's rollouts as 32 steps of 32 prompts x 4 responses, not 64 of 8 x 8: the same 4,096
#   rollouts over four times the prompts, in half the updates. On 798 held-out chats a
#   language (AMD EPYC Turin), after a bf16 run's DPO and an fp32 run's: 64 x 8 x 8 at 5e-5
#   gained -0.8 / -0.3 and +4.4 / +1.5 points; 32 x 32 x 4 at 1e-4 +1.6 / +3.0 and
#   +4.3 / +2.3, in less time (32 x 16 x 8 at 1e-4: +1.1 / +1.3 and +4.1 / +1.6).
MUON = {"optimizer": "muon"}
DEFAULT_PLANS: dict[str, StagePlan] = {
    "pretrain": StagePlan("pretrain", "seq", "pretrain.jsonl", steps=380, batch_size=16,
                          learning_rate=3e-3, warmup_steps=20, max_seq_len=128, values=MUON),
    "sft": StagePlan("sft", "sft", "sft.jsonl", steps=240, batch_size=16, learning_rate=1e-3,
                     warmup_steps=10, max_seq_len=128, values=MUON),
    "dpo": StagePlan("dpo", "dpo", "dpo.jsonl", steps=48, batch_size=16, learning_rate=5e-5,
                     values={"dpo_beta": 0.1, "dpo_rpo_alpha": 2.0}, on_policy_samples=4),
    "grpo": StagePlan("grpo", "grpo", "grpo.jsonl", steps=32, batch_size=32, learning_rate=1e-4,
                      values={"grpo_kl_coef": 0.04, "grpo_clip_eps": 0.2,
                              "grpo_scale_rewards": False, **MUON}),
}


@dataclass
class QuickstartConfig:
    """Everything `astrai quickstart` does, with defaults for a laptop CPU."""

    out: Path = Path("runs/quickstart")
    seed: int = 0
    steps_scale: float = 1.0
    preset: str = "mini"
    corpus_size: int = 2000  # SFT chats; the other corpus files scale with it
    vocab_size: int = 2048  # asked of BPE; the corpus may allow fewer (the model follows the tokenizer)
    group_size: int = 4  # GRPO responses per prompt
    max_new_tokens: int = 24  # GRPO rollouts, evaluation and sample chats
    temperature: float = 1.0  # GRPO rollouts (evaluation is greedy)
    rewards: tuple[str, ...] = ("exact_answer", "format")
    eval_limit: int | None = None  # held-out records per evaluation file (None: all)
    serve: bool = False
    port: int = 8000
    progress: bool = True
    plans: dict[str, StagePlan] = field(default_factory=lambda: dict(DEFAULT_PLANS))

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.steps_scale > 0:
            raise ValueError(f"--steps-scale must be > 0, got {self.steps_scale}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.corpus_size < 20:
            raise ValueError(f"--corpus-size must be >= 20 records, got {self.corpus_size}")
        for i, name in enumerate(STAGES):
            plan = self.plans[name]
            if plan.on_policy_samples and (plan.strategy != "dpo" or i == 0):
                raise ValueError(f"the {name} stage samples on-policy pairs, which only a dpo "
                                 "stage after another stage can: set on_policy_samples=0")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO compares responses), got {self.group_size}")

    def plan(self, stage: str) -> StagePlan:
        return self.plans[stage].scaled(self.steps_scale)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the results: a re-run into the same --out must match them."""
        return {"seed": self.seed, "steps_scale": self.steps_scale, "preset": self.preset,
                "corpus_size": self.corpus_size, "vocab_size": self.vocab_size,
                "group_size": self.group_size, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "rewards": list(self.rewards),
                "plans": {k: dataclasses.asdict(self.plan(k)) for k in STAGES}}
