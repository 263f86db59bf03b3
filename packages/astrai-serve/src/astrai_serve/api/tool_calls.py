"""Tool calls: which syntax the model's chat template asks for, the grammar that forces a call
(`tool_choice` "required" or a named function), and the parser that turns the model's text into
OpenAI `tool_calls`, whole or as it streams.

Two syntaxes cover the templates in use:
- "tagged" (Hermes; Qwen2/2.5/3 and our default template): `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`, one block per call, newlines inside the tags allowed;
- "json" (Llama 3.x): the whole reply is `{"name": ..., "parameters": {...}}`.
A template that mentions `<tool_call>` is tagged; any other is json.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

OPEN, CLOSE = "<tool_call>", "</tool_call>"
Syntax = Literal["tagged", "json"]


def syntax_of(chat_template: str) -> Syntax:
    return "tagged" if OPEN in chat_template else "json"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(text: str, names: set[str]) -> ToolCall | None:
    """A call to one of `names` written as JSON, or None if `text` is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


class ToolCallParser:
    """Splits one choice's text into content and tool calls. `feed` takes text as it streams
    and returns what is final: content that cannot be part of a call, and calls once complete;
    text that may still become a call (a partial `<tool_call>`, an open block, a reply that
    starts like a JSON call) is held back until `finish`."""

    def __init__(self, syntax: Syntax, names: set[str]) -> None:
        self.syntax = syntax
        self.names = names
        self.calls: list[ToolCall] = []
        self._pending = ""
        self._inside = False  # within <tool_call>...</tool_call>
        self._space = ""  # whitespace held until content or the end decides what it belongs to
        self._json_mode: bool | None = None  # json syntax: does the reply start with "{"?

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        if self.syntax == "json":
            return self._feed_json()
        content, calls = [], []
        while True:
            if self._inside:
                end = self._pending.find(CLOSE)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                self._inside = False
                call = parse_call(body.strip(), self.names)
                if call is None:  # not a call after all: it is text
                    content.append(OPEN + body + CLOSE)
                else:
                    calls.append(call)
                continue
            start = self._pending.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self._pending, OPEN)
                content.append(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                break
            content.append(self._pending[:start])
            self._pending = self._pending[start + len(OPEN):]
            self._inside = True
        return self._content("".join(content)), self._record(calls)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest, once the text is complete (an unclosed last block still counts)."""
        rest, self._pending = self._pending, ""
        if self.syntax == "json":
            return self._finish_json(rest)
        if self._inside:
            self._inside = False
            call = parse_call(rest.strip(), self.names)
            if call is not None:
                return self._content("", final=True), self._record([call])
            rest = OPEN + rest
        return self._content(rest, final=True), []

    # -- helpers -------------------------------------------------------------------------------
    def _feed_json(self) -> tuple[str, list[ToolCall]]:
        if self._json_mode is None and self._pending.strip():
            self._json_mode = self._pending.lstrip().startswith(("{", "["))
        if self._json_mode is False:
            text, self._pending = self._pending, ""
            return self._content(text), []
        return "", []

    def _finish_json(self, rest: str) -> tuple[str, list[ToolCall]]:
        if self._json_mode:
            calls = _json_calls(rest.strip(), self.names)
            if calls:
                return "", self._record(calls)
        return self._content(rest, final=True), []

    def _content(self, text: str, final: bool = False) -> str:
        """Content with whitespace that borders a call held back: it is dropped when the reply
        turns out to be only calls, and released before the next real text otherwise."""
        text = self._space + text
        if final:
            self._space = ""
            return "" if self.calls and not text.strip() else text
        stripped = text.rstrip()
        self._space = text[len(stripped):]
        return stripped

    def _record(self, calls: list[ToolCall]) -> list[ToolCall]:
        self.calls += calls
        return calls


def _json_calls(text: str, names: set[str]) -> list[ToolCall]:
    """One JSON call, a JSON list of them, or calls separated by ';' (as Llama 3.2 writes)."""
    call = parse_call(text, names)
    if call is not None:
        return [call]
    try:
        items = json.loads(text)
    except ValueError:
        parts = [parse_call(p.strip(), names) for p in text.split(";")]
        return [p for p in parts if p is not None] if all(parts) else []
    if isinstance(items, list):
        parsed = [parse_call(json.dumps(item), names) for item in items]
        return [p for p in parsed if p is not None] if all(parsed) else []
    return []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# -- forcing a call -----------------------------------------------------------------------------
def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: quotes and backslashes escaped


def call_grammar(syntax: Syntax, tools: Sequence[tuple[str, dict[str, Any]]],
                 many: bool) -> str:
    """A Lark grammar (llguidance's dialect) for one call, or with `many` one or more, to one of
    `tools` ((name, parameters schema) pairs), each call's arguments compact JSON matching the
    function's parameters. The wrapper is spelled as the templates show it to the model."""
    key = "arguments" if syntax == "tagged" else "parameters"
    rules = []
    for i, (name, parameters) in enumerate(tools):
        schema = {**parameters, "x-guidance": {"whitespace_flexible": False}}
        head = _lark_string(f'{{"name": {json.dumps(name)}, "{key}": ')
        rules.append(f"call_{i}: {head} args_{i} \"}}\"\nargs_{i}: %json {json.dumps(schema)}")
    body = " | ".join(f"call_{i}" for i in range(len(tools)))
    if syntax == "tagged":
        one = f'"{OPEN}" "\\n"? ({body}) "\\n"? "{CLOSE}"'
        start = f"start: block (\"\\n\"? block)*\nblock: {one}" if many else f"start: {one}"
    else:
        start = f"start: {body}"  # the json syntax has no separator the templates agree on
    return "\n".join([start, *rules]) + "\n"
