"""Validation of input lines: each parser turns one JSON object into a typed record or raises
`InvalidRecord` with a reason that the pipeline prefixes with FILE:LINE."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_CJK = re.compile(r"[\u3400-\u9fff]")


class InvalidRecord(ValueError):
    """A line that cannot become a training record; the message is the reason."""


Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PromptRecord:
    """A prompt (as chat messages) with the responses a dpo/grpo record attaches to it."""

    messages: Messages
    responses: list[str]
    rewards: list[float] | None = None


@dataclass(frozen=True)
class OnlinePrompt:
    messages: Messages
    prompt: str
    answer: str
    lang: str


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in obj:
        raise InvalidRecord(f"missing field '{name}'")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidRecord(f"field '{name}' must be {what}, got {type(value).__name__}")
    return value


def _text(obj: dict[str, Any], name: str) -> str:
    value = _field(obj, name, str, "a string")
    if not value.strip():
        raise InvalidRecord(f"field '{name}' is empty")
    return value


def parse_messages(obj: dict[str, Any], need_assistant: bool) -> Messages:
    messages = _field(obj, "messages", list, "a list of {role, content} objects")
    if not messages:
        raise InvalidRecord("field 'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise InvalidRecord(f"messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InvalidRecord(f"messages[{i}].role is '{m['role']}'; expected one of "
                                f"{', '.join(ROLES)}")
        if not m["content"].strip():
            raise InvalidRecord(f"messages[{i}].content is empty")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no assistant message: nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_prompt(obj: dict[str, Any]) -> Messages:
    """`prompt` (a user message) or `messages` ending with a user turn, but not both."""
    if ("prompt" in obj) == ("messages" in obj):
        raise InvalidRecord("needs exactly one of 'prompt' (a string) or 'messages' (a chat)")
    if "prompt" in obj:
        return [{"role": "user", "content": _text(obj, "prompt")}]
    messages = parse_messages(obj, need_assistant=False)
    if messages[-1]["role"] != "user":
        raise InvalidRecord("the last message of a prompt must be from the user")
    return messages


def parse_seq(obj: dict[str, Any]) -> str:
    return _text(obj, "text")


def parse_sft(obj: dict[str, Any]) -> Messages:
    return parse_messages(obj, need_assistant=True)


def parse_dpo(obj: dict[str, Any]) -> PromptRecord:
    return PromptRecord(parse_prompt(obj), [_text(obj, "chosen"), _text(obj, "rejected")])


def grpo_mode(obj: dict[str, Any]) -> str:
    """'offline' (scored responses) or 'online' (a reference answer for a reward function)."""
    has_responses, has_answer = "responses" in obj, "answer" in obj
    if has_responses == has_answer:
        raise InvalidRecord("a grpo record needs 'responses' and 'rewards' (offline) or "
                            "'answer' (online), not " + ("both" if has_answer else "neither"))
    return "offline" if has_responses else "online"


def parse_grpo_offline(obj: dict[str, Any]) -> PromptRecord:
    messages = parse_prompt(obj)
    responses = _field(obj, "responses", list, "a list of strings")
    rewards = _field(obj, "rewards", list, "a list of numbers")
    if not responses:
        raise InvalidRecord("field 'responses' is empty")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise InvalidRecord(f"responses[{i}] must be a non-empty string")
    if len(rewards) != len(responses):
        raise InvalidRecord(f"{len(responses)} responses but {len(rewards)} rewards")
    for i, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r):
            raise InvalidRecord(f"rewards[{i}] must be a finite number, got {r!r}")
    return PromptRecord(messages, responses, [float(r) for r in rewards])


def detect_lang(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def parse_grpo_online(obj: dict[str, Any]) -> OnlinePrompt:
    messages = parse_prompt(obj)
    answer = _field(obj, "answer", (str, int, float), "a string or a number")
    answer = str(answer).strip()
    if not answer:
        raise InvalidRecord("field 'answer' is empty")
    prompt = messages[-1]["content"]
    lang = obj.get("lang", detect_lang(prompt))
    if lang not in ("en", "zh"):
        raise InvalidRecord(f"field 'lang' must be 'en' or 'zh', got {lang!r}")
    return OnlinePrompt(messages, prompt, answer, lang)
