"""Reward functions for online GRPO: plain callables

    reward(prompt: str, response: str, **record) -> float

where `record` holds the prompt item's other fields (for the synthetic corpus: answer, lang,
messages). They are named on the command line as `module:function` or by a built-in name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from astrai_data import exact_answer_reward, format_reward

RewardFn = Callable[..., float]
RewardSpec = str | RewardFn | Sequence[str | RewardFn]  # a name, module:function, callable, or several


def exact_answer(prompt: str, response: str, *, answer: str | None = None,
                 lang: str | None = None, **record: Any) -> float:
    """1.0 when the reply's answer (last number of its first sentence) equals `answer`."""
    if answer is None:
        raise ValueError("the exact_answer reward needs an 'answer' in each prompt item; "
                         "online GRPO files from `astrai data prepare --strategy grpo` have one")
    return exact_answer_reward(response, answer, lang)


def answer_format(prompt: str, response: str, *, lang: str = "en", **record: Any) -> float:
    """1.0 when the reply is exactly one canonical answer sentence in the asked language."""
    return format_reward(response, lang)


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_answer": exact_answer, "format": answer_format}


def load_reward(spec: str) -> RewardFn:
    """A built-in name (exact_answer, format) or `package.module:function`."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.strip().partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ValueError(f"reward {spec!r}: expected a built-in ({', '.join(BUILTIN_REWARDS)}) "
                         "or module:function, e.g. my_rewards:length_penalty")
    module = _import(spec, module_name)
    fn = getattr(module, attr, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}; "
                         f"it defines: {', '.join(defined) or 'no functions'}")
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function "
                         "reward(prompt, response, **record) -> float")
    return fn


def _import(spec: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not f"{module_name}.".startswith(f"{exc.name}."):
            raise ValueError(f"reward {spec!r}: importing {module_name!r} failed, it needs "
                             f"{exc.name!r}: install that package") from None
        raise ValueError(f"reward {spec!r}: no module named {module_name!r}; run from the folder "
                         "that holds it, add that folder to PYTHONPATH, or install it") from None
    except SyntaxError as exc:
        raise ValueError(f"reward {spec!r}: {exc.filename}, line {exc.lineno}: {exc.msg}; fix "
                         "the module's syntax") from None


class MeanReward:
    """Several rewards as one: their mean, so the total stays on the scale of each (0..1)."""

    def __init__(self, fns: Sequence[RewardFn], names: Sequence[str]) -> None:
        self.fns, self.names = list(fns), list(names)

    def __call__(self, prompt: str, response: str, **record: Any) -> float:
        scores = [float(fn(prompt, response, **record)) for fn in self.fns]
        return sum(scores) / len(scores)

    def __repr__(self) -> str:
        return f"MeanReward({', '.join(self.names)})"


def build_reward(specs: RewardSpec) -> RewardFn:
    """One reward from one or several specs (names, module:function, callables, or one string of
    comma-separated names); several are averaged, so `--reward exact_answer,format` scores 0.5 for a well-formed wrong answer."""
    if isinstance(specs, str):
        items: list[str | RewardFn] = [s.strip() for s in specs.split(",") if s.strip()]
    else:
        items = [specs] if callable(specs) else list(specs)
    if not items:
        raise ValueError("online GRPO needs a reward: --reward exact_answer, --reward format or "
                         "--reward module:function")
    fns = [load_reward(s) if isinstance(s, str) else s for s in items]
    if len(fns) == 1:
        return fns[0]
    return MeanReward(fns, [s if isinstance(s, str) else getattr(s, "__name__", repr(s)) for s in items])
