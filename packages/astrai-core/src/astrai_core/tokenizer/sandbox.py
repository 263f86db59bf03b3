"""The sandboxed Jinja2 environment chat templates run in.

Chat templates ship inside model folders from the internet, so they are untrusted code: they run
in jinja2's immutable sandbox (no attribute access to Python internals, no mutation of the data
passed in). The environment offers what Hugging Face templates rely on, configured the same way,
so a template renders here exactly as it does in `transformers`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateRaisedError(TemplateError):
    """The template itself called `raise_exception(message)`: it rejects the conversation."""


def raise_exception(message: str) -> None:
    raise TemplateRaisedError(message)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>` and `&`, which would corrupt tool schemas and
    # differ from what models were trained on; templates expect plain `json.dumps`.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def strftime_now(date_format: str) -> str:
    """Today's date in the template's format (Llama 3.x templates print it in the system turn)."""
    return datetime.now().strftime(date_format)


class GenerationBlock(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (marks assistant text in some Hugging Face
    templates). The body renders unchanged; AstrAI finds assistant text by rendering prefixes of
    the conversation instead, which works for templates without the tag too."""

    tags = {"generation"}  # noqa: RUF012  (jinja2 declares this as a plain class attribute)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def build_environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks/lstrip_blocks: Hugging Face renders with both on; templates are written for it.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
