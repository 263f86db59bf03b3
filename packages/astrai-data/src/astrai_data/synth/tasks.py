"""Task generators: each renders one question and its canonical reply in English or Chinese.

A task instance is a key (e.g. (3, "+", 4)) rendered through a template. The held-out split is
fixed by the key or the template, never by the seed, so evaluation prompts are the same for every
corpus and never occur in a training file:
- numeric tasks hold out keys (a stable hash of the key picks about one in eight);
- fact tasks, whose keys are few, hold out question templates.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from random import Random
from typing import Any, ClassVar, Literal

Split = Literal["train", "eval"]
LANGS = ("en", "zh")
Key = tuple[Any, ...]


@dataclass(frozen=True)
class QA:
    task: str
    lang: str
    prompt: str
    reply: str
    reference: str | None
    """The exact answer a reward function checks (numeric tasks), else None."""


def held_out_key(key: Key) -> bool:
    return zlib.crc32(repr(key).encode()) % 8 == 0


class Task(ABC):
    name: ClassVar[str]
    # Question templates per language, for training and for the held-out split.
    templates: ClassVar[dict[str, dict[Split, list[str]]]]
    holds_out_keys: ClassVar[bool] = False

    @abstractmethod
    def instances(self) -> list[Key]:
        """Every instance of the task."""

    @abstractmethod
    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        """Template fields of a key in a language."""

    @abstractmethod
    def reply_template(self, key: Key, lang: str) -> str: ...

    def reference(self, key: Key) -> str | None:
        return None

    def wrong_key(self, key: Key, rng: Random) -> Key:
        """Another instance whose reply is a plausible wrong answer to `key`."""
        right = self.reply(key, "en")
        while True:  # fact tasks have 10+ instances with distinct replies: this ends quickly
            other = rng.choice(self.split_keys("train"))
            if self.reply(other, "en") != right:
                return other

    def split_keys(self, split: Split) -> list[Key]:
        cache = self.__dict__.setdefault("_split_keys", {})
        if split not in cache:
            cache[split] = [k for k in self.instances()
                            if not self.holds_out_keys or held_out_key(k) == (split == "eval")]
        return cache[split]

    def template_split(self, split: Split) -> Split:
        return "train" if self.holds_out_keys else split

    def prompts(self, key: Key, lang: str, split: Split) -> list[str]:
        """Every phrasing of the question `key` in a split (its templates, filled in)."""
        fields = self.fields(key, lang)
        return [t.format(**fields) for t in self.templates[lang][self.template_split(split)]]

    def prompt(self, key: Key, lang: str, rng: Random, split: Split) -> str:
        return rng.choice(self.prompts(key, lang, split))

    def reply(self, key: Key, lang: str, **override: Any) -> str:
        """The canonical reply; `override` replaces fields (how wrong replies are made)."""
        text = self.reply_template(key, lang).format(**{**self.fields(key, lang), **override})
        return text[:1].upper() + text[1:]

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        return self.reply(self.wrong_key(key, rng), lang)

    def sample(self, rng: Random, lang: str, split: Split) -> QA:
        key = rng.choice(self.split_keys(split))
        return QA(self.name, lang, self.prompt(key, lang, rng, split), self.reply(key, lang),
                  self.reference(key))

    def sample_key(self, rng: Random, split: Split) -> Key:
        return rng.choice(self.split_keys(split))


class Arithmetic(Task):
    name = "arithmetic"
    holds_out_keys = True
    templates: ClassVar = {
        "en": {"train": ["What is {a} {op} {b}?", "What is {a} {word} {b}?", "Calculate {a} {op} {b}.",
                         "How much is {a} {op} {b}?"], "eval": []},
        "zh": {"train": ["{a} {zh} {b} 等于多少？", "{a} {op} {b} 等于几？", "计算 {a} {zh} {b}。",
                         "{a} {zh} {b} 是多少？"], "eval": []},
    }

    def instances(self) -> list[Key]:
        adds = [(a, "+", b) for a in range(21) for b in range(21)]
        subs = [(a, "-", b) for a in range(21) for b in range(a + 1)]
        return adds + subs

    @staticmethod
    def value(key: Key) -> int:
        a, op, b = key
        return a + b if op == "+" else a - b

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        a, op, b = key
        return {"a": a, "b": b, "op": op, "c": self.value(key),
                "word": "plus" if op == "+" else "minus", "zh": "加" if op == "+" else "减"}

    def reply_template(self, key: Key, lang: str) -> str:
        return "{a} {op} {b} = {c}." if lang == "en" else "{a} {zh} {b} 等于 {c}。"

    def reference(self, key: Key) -> str:
        return str(self.value(key))

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        wrong = max(self.value(key) + rng.choice([-3, -2, -1, 1, 2, 3]), 0)
        if wrong == self.value(key):
            wrong += 1
        return self.reply(key, lang, c=wrong)


class Compare(Task):
    name = "compare"
    holds_out_keys = True
    templates: ClassVar = {
        "en": {"train": ["Which is bigger, {a} or {b}?", "Which number is larger, {a} or {b}?"],
               "eval": []},
        "zh": {"train": ["{a} 和 {b} 哪个大？", "{a} 和 {b} 哪个更大？"], "eval": []},
    }

    def instances(self) -> list[Key]:
        return [(a, b) for a in range(31) for b in range(31) if a != b]

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        return {"a": key[0], "b": key[1], "m": max(key)}

    def reply_template(self, key: Key, lang: str) -> str:
        return "The bigger number is {m}." if lang == "en" else "更大的数是 {m}。"

    def reference(self, key: Key) -> str:
        return str(max(key))

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        return self.reply(key, lang, m=min(key))


class Successor(Task):
    name = "successor"
    holds_out_keys = True
    templates: ClassVar = {
        "en": {"train": ["What number comes after {n}?", "What comes after {n}?"], "eval": []},
        "zh": {"train": ["{n} 后面是几？", "{n} 的下一个数是几？"], "eval": []},
    }

    def instances(self) -> list[Key]:
        return [(n,) for n in range(50)]

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        return {"n": key[0], "m": key[0] + 1}

    def reply_template(self, key: Key, lang: str) -> str:
        return "The number after {n} is {m}." if lang == "en" else "{n} 后面是 {m}。"

    def reference(self, key: Key) -> str:
        return str(key[0] + 1)

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        wrong = (key[0] + rng.choice([0, 2, 3])) if key[0] else 2
        return self.reply(key, lang, m=wrong)


class Count(Task):
    name = "count"
    holds_out_keys = True
    templates: ClassVar = {
        "en": {"train": ["Count from {s} to {e}.", "Please count from {s} to {e}."], "eval": []},
        "zh": {"train": ["从 {s} 数到 {e}。", "请从 {s} 数到 {e}。"], "eval": []},
    }

    def instances(self) -> list[Key]:
        return [(s, s + n) for s in range(1, 16) for n in range(2, 6)]

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        sep = ", " if lang == "en" else "、"
        return {"s": key[0], "e": key[1], "seq": sep.join(map(str, range(key[0], key[1] + 1)))}

    def reply_template(self, key: Key, lang: str) -> str:
        return "{seq}." if lang == "en" else "{seq}。"

    def reference(self, key: Key) -> str:
        """The whole sequence, space-separated: every number must be there, in order."""
        return " ".join(map(str, range(key[0], key[1] + 1)))

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        numbers = list(range(key[0], key[1] + 1))
        del numbers[rng.randrange(1, len(numbers))]  # skip one number
        sep, end = (", ", ".") if lang == "en" else ("、", "。")
        return sep.join(map(str, numbers)) + end
