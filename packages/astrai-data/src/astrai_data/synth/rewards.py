"""Checking replies to the synthetic numeric tasks: the answer extractor and the checks that
astrai-train's built-in rewards (`exact_answer`, `format`: its one reward registry) and the
quickstart's evaluation use.

Every numeric reply ends its first sentence with the answer:
    en: "3 + 4 = 7."  "The bigger number is 12."  "The number after 7 is 8."
    zh: "3 加 4 等于 7。"  "更大的数是 12。"  "7 后面是 8。"
Counting answers with the whole sequence, which is its reference (space-separated):
    en: "3, 4, 5, 6."  zh: "3、4、5、6。"  reference "3 4 5 6"
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.。!?！？\n]")
_INTEGER = re.compile(r"-?\d+")

CANONICAL = {
    "en": [re.compile(r"\d+ [+-] \d+ = -?\d+\."), re.compile(r"The bigger number is \d+\."),
           re.compile(r"The number after \d+ is \d+\."), re.compile(r"\d+(?:, \d+)+\.")],
    "zh": [re.compile(r"\d+ [加减] \d+ 等于 -?\d+。"), re.compile(r"更大的数是 \d+。"),
           re.compile(r"\d+ 后面是 \d+。"), re.compile(r"\d+(?:、\d+)+。")],
}


def _first_sentence_integers(text: str) -> list[str]:
    return _INTEGER.findall(_SENTENCE_END.split(text.strip(), maxsplit=1)[0])


def extract_answer(text: str, lang: str | None = None) -> str | None:
    """The last integer of the reply's first sentence (None when it has none). Text a model
    generates after that sentence is ignored. `lang` is accepted for symmetry; both languages
    put the answer in the same place."""
    numbers = _first_sentence_integers(text)
    return numbers[-1] if numbers else None


def exact_answer_reward(response: str, answer: str, lang: str | None = None) -> float:
    """1.0 when the reply answers `answer`, else 0.0. A one-number answer is the last integer
    of the reply's first sentence; a sequence ("3 4 5 6", counting) must be that sentence's
    integers exactly: none missing, none extra, in order."""
    expected = str(answer).split()
    if len(expected) > 1:
        return 1.0 if _first_sentence_integers(response) == expected else 0.0
    return 1.0 if expected and extract_answer(response, lang) == expected[0] else 0.0


def format_reward(response: str, lang: str) -> float:
    """1.0 when the reply is exactly one canonical sentence in the asked language, else 0.0
    (a reply in the wrong language, with extra text, or cut short scores 0)."""
    if lang not in CANONICAL:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    text = response.strip()
    return 1.0 if any(p.fullmatch(text) for p in CANONICAL[lang]) else 0.0
