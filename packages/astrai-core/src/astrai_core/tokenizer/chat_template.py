"""`ChatTemplate`: a Jinja2 chat template (the Hugging Face format) that turns messages into text.

Every way a template can fail (bad syntax, `raise_exception`, an unknown role, a runtime error
inside the template) surfaces as one `ChatTemplateError` naming the template, the reason, the
template line and the message that triggered it, never as a bare jinja2 traceback.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import Template, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError

from astrai_core.tokenizer.sandbox import TemplateRaisedError, build_environment

Message = dict[str, Any]

# ChatML turns with our special tokens. The system prompt is optional; tools, when given, are
# listed as JSON schemas in the system turn, and assistant tool calls render as <tool_call> JSON.
DEFAULT_CHAT_TEMPLATE = """{%- macro text_of(message) -%}
    {%- if message.content is string -%}
        {{- message.content -}}
    {%- elif message.content is iterable -%}
        {%- for part in message.content if part.type == 'text' -%}{{- part.text -}}{%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if messages and messages[0].role == 'system' -%}{{- text_of(messages[0]) + '\\n\\n' -}}{%- endif -%}
    {{- '# Tools\\n\\nYou can call these functions, each described by a JSON schema:\\n<tools>' -}}
    {%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}
    {{- '\\n</tools>\\n\\nTo call one, reply with <tool_call>{"name": <name>, "arguments": <JSON object>}</tool_call>.<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role not in ('system', 'user', 'assistant', 'tool') -%}
        {{- raise_exception("unknown role '" ~ message.role ~ "': the default chat template accepts system, user, assistant and tool") -}}
    {%- endif -%}
    {%- if not (tools and loop.first and message.role == 'system') -%}
        {{- '<|im_start|>' + message.role + '\\n' + text_of(message) -}}
        {%- if message.role == 'assistant' -%}
            {%- for call in message.tool_calls or [] -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- if text_of(message) or not loop.first -%}{{- '\\n' -}}{%- endif -%}
                {{- '<tool_call>{"name": ' + fn.name | tojson + ', "arguments": ' -}}
                {{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
                {{- '}</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

_ENV = build_environment()  # configured once here and never changed afterwards


class ChatTemplateError(ValueError):
    """A chat template could not be compiled, or refused or failed to render a conversation."""


class ChatTemplate:
    """A compiled chat template. `render` fills it with messages and template variables."""

    def __init__(self, template_str: str, name: str = "chat template") -> None:
        if not isinstance(template_str, str):
            raise TypeError(f"{name}: a chat template is a string of Jinja2, got {type(template_str).__name__}")
        if not template_str.strip():
            raise ChatTemplateError(f"{name} is empty; pass Jinja2 text, e.g. ChatTemplate.default()")
        self.template_str = template_str
        self.name = name
        self._compiled = _compile(template_str, name)

    @classmethod
    def from_string(cls, template: str, name: str = "custom chat template") -> ChatTemplate:
        return cls(template, name=name)

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_CHAT_TEMPLATE, name="default chat template")

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, {len(self.template_str)} chars)"

    def render(self, messages: Sequence[Any], system_prompt: str | None = None,
               **extra_variables: Any) -> str:
        """The conversation as text. `system_prompt` is used when the conversation has no system
        message of its own. Variables default as in Hugging Face: `add_generation_prompt=False`,
        `tools=None`, `documents=None`; pass `bos_token`, `eos_token`, ... as extra variables."""
        chat = normalize_messages(messages, self.name)
        if system_prompt is not None and not (chat and chat[0]["role"] == "system"):
            chat.insert(0, {"role": "system", "content": system_prompt})
        variables = {"tools": None, "documents": None, "add_generation_prompt": False, **extra_variables}
        try:
            return self._compiled.render(messages=chat, **variables)
        except Exception as exc:  # the template is foreign code: any failure in it is a template error
            raise self._explain(exc, chat, variables) from exc

    def _explain(self, exc: Exception, chat: list[Message], variables: dict[str, Any]) -> ChatTemplateError:
        reason = _reason(exc)
        where = _template_line(exc)
        culprit = self._culprit(chat, variables, str(exc))
        if culprit is None:
            roles = ", ".join(m["role"] for m in chat) or "no messages"
            subject = f"conversation ({roles})"
        else:
            subject = f"message {culprit} {_describe(chat[culprit])}"
        return ChatTemplateError(
            f"{self.name}{where} failed on {subject}: {reason}. "
            "Fix the message, or the template if the message is valid.")

    def _culprit(self, chat: list[Message], variables: dict[str, Any], error: str) -> int | None:
        """The first message whose addition makes rendering fail with the same error, if any."""
        for end in range(1, len(chat) + 1):
            try:
                self._compiled.render(messages=chat[:end], **variables)
            except Exception as exc:
                return end - 1 if str(exc) == error else None
        return None


def _compile(template_str: str, name: str) -> Template:
    try:
        return _ENV.from_string(template_str)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"{name} has a Jinja2 syntax error at line {exc.lineno}: {exc.message}. "
            "Fix the template text (the same Jinja2 dialect as Hugging Face chat templates)."
        ) from exc


def normalize_messages(messages: Sequence[Any], template_name: str = "chat template") -> list[Message]:
    """Plain dicts with None-valued keys dropped (as Hugging Face does: templates test for a
    missing key, not for None). Pydantic models and dataclasses are accepted too."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise TypeError(f"{template_name}: messages must be a list of dicts like "
                        f"{{'role': 'user', 'content': 'hi'}}, got {type(messages).__name__}")
    chat = []
    for index, message in enumerate(messages):
        plain = _as_dict(message)
        if plain is None:
            raise TypeError(f"{template_name}: message {index} is a {type(message).__name__}; "
                            "pass a dict like {'role': 'user', 'content': 'hi'}")
        if not isinstance(plain.get("role"), str):
            raise ChatTemplateError(f"{template_name}: message {index} {_describe(plain)} has no "
                                    "'role' string; give every message a role such as 'user'")
        chat.append({key: value for key, value in plain.items() if value is not None})
    return chat


def _as_dict(message: Any) -> dict[str, Any] | None:
    if isinstance(message, Mapping):
        return dict(message)
    if callable(getattr(message, "model_dump", None)):  # pydantic, e.g. the serving API's messages
        return dict(message.model_dump())
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return dataclasses.asdict(message)
    return None


def _reason(exc: Exception) -> str:
    if isinstance(exc, TemplateRaisedError):
        return f"the template rejected it: {exc}"
    if isinstance(exc, SecurityError):
        return f"the template attempted an operation the sandbox forbids: {exc}"
    if isinstance(exc, UndefinedError):
        return f"the template used something undefined: {exc}"
    return f"{type(exc).__name__} inside the template: {exc}"


def _template_line(exc: BaseException) -> str:
    """` (line N)`: jinja2 rewrites tracebacks so template frames carry template line numbers."""
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
             if frame.filename == "<template>"]
    return f" (line {lines[-1]})" if lines else ""


def _describe(message: Mapping[str, Any], limit: int = 120) -> str:
    text = json.dumps(message, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."
