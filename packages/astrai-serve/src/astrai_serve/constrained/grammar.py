"""Grammars compiled by llguidance for one tokenizer, and each request's matcher.

Why llguidance (compared with xgrammar and outlines-core, see the package README): it is one
7 MB wheel with no Python dependencies (xgrammar pulls in torch, transformers and triton), it
reads a Hugging Face `tokenizers` JSON as it is, byte-level BPE included, and it computes each
mask on the fly (an Earley parser walks a trie of the vocabulary's token bytes, skipping the
branches the lexer cannot enter), so a new schema costs milliseconds to compile where
outlines-core first builds an index of the whole vocabulary against the schema's automaton,
and recursive schemas work (outlines-core turns a schema into one regular expression).

Every JSON grammar here is compact (no optional whitespace between tokens, as OpenAI's own
structured outputs): there is one way to write each value, so even a model with random weights
cannot wander in whitespace and finishes as soon as the value is complete.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

INSTALL_HINT = ("constrained decoding (response_format, forced tool calls) needs the llguidance "
                "package: pip install 'llguidance>=1.0'")
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_LOCATE_ATTEMPTS = 200  # compilations spent finding the part of a schema that was refused

# JSON Schema keywords whose value is a subschema, a list of them, or a name -> subschema map.
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
        "propertyNames", "additionalItems", "unevaluatedProperties", "unevaluatedItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class GrammarError(ValueError):
    """A schema or grammar the grammar library refused. `path` is a JSON pointer to the part of
    the schema it refused ("" for the schema as a whole), when it could be found."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class GrammarUnavailable(RuntimeError):
    """llguidance is not installed."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:
        raise GrammarUnavailable(INSTALL_HINT) from exc
    return llguidance


class GrammarCompiler:
    """Compiles JSON schemas and Lark grammars against one tokenizer.

    Args:
        tokenizer: an `AutoTokenizer` (its `backend` is a Hugging Face `tokenizers.Tokenizer`).
        vocab_size: the model's logits width (may exceed the tokenizer's; the rest is masked).
        stop_ids: the tokens that end a sequence; a finished grammar allows only these.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        llg = _llguidance()
        self._llg = llg
        self.vocab_size = vocab_size
        self.stop_ids = sorted(int(t) for t in stop_ids)
        backend = tokenizer.backend
        self._tokenizer = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size,
                                          eos_token=self.stop_ids)
        self._cache: dict[str, Grammar] = {}
        self._lock = threading.Lock()

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        """Output exactly one JSON value matching `schema`; `GrammarError` names what it refused."""
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema is an object, got {type(schema).__name__}", "")
        key = "json:" + json.dumps(schema)  # key order kept: it is the order keys are written
        return self._cached(key, lambda: self._compile(self._from_schema(schema),
                                                       lambda: self._locate(schema)))

    def json_object(self) -> Grammar:
        """Any JSON object (`response_format: {"type": "json_object"}`)."""
        return self.json_schema({"type": "object"})

    def lark(self, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (`%json {...}` embeds a JSON schema)."""
        return self._cached("lark:" + text,
                            lambda: self._compile(self._llg.LLMatcher.grammar_from_lark(text)))

    # -- compiling ---------------------------------------------------------------------------
    def _cached(self, key: str, build: Callable[[], Grammar]) -> Grammar:
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        grammar = build()
        with self._lock:
            if len(self._cache) >= 256:
                self._cache.pop(next(iter(self._cache)))  # oldest first
            self._cache[key] = grammar
        return grammar

    def _from_schema(self, schema: dict[str, Any]) -> str:
        try:
            return self._llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the schema is not valid JSON: {exc}", "") from None

    def _error(self, grammar: str) -> str | None:
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(
            grammar, self._tokenizer)
        return messages[0] if is_error and messages else None

    def _compile(self, grammar: str, locate: Callable[[], str | None] | None = None) -> Grammar:
        error = self._error(grammar)
        if error is None:
            matcher = self._llg.LLMatcher(self._tokenizer, grammar, log_level=0)
            error = matcher.get_error() if matcher.is_error() else None
            if error is None:
                return Grammar(matcher, self.stop_ids)
        raise GrammarError(error.strip(), locate() if locate is not None else None)

    def _locate(self, schema: dict[str, Any]) -> str | None:
        """The JSON pointer of the deepest subschema whose replacement by `{}` (anything) lets
        the schema compile: the part the library refused. "" when only the whole schema fails
        (a keyword of the root, or errors in several places)."""
        attempts = 0

        def fails(candidate: dict[str, Any]) -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return self._error(self._from_schema(candidate)) is not None
            except GrammarError:
                return True

        path: list[str] = []
        while attempts < MAX_LOCATE_ATTEMPTS:
            node = _at(schema, path)
            for key in _children(node):
                if attempts >= MAX_LOCATE_ATTEMPTS:
                    return None
                if not fails(_replaced(schema, [*path, *key], {})):
                    path = [*path, *key]
                    break
            else:
                return _pointer(path)
        return None


def _children(node: Any) -> Iterator[list[str]]:
    """Paths (relative to `node`) of its direct subschemas."""
    if not isinstance(node, dict):
        return
    for name in _MAP:
        if isinstance(node.get(name), dict):
            for key in node[name]:
                yield [name, key]
    for name in _LIST:
        if isinstance(node.get(name), list):
            for i in range(len(node[name])):
                yield [name, str(i)]
    for name in _ONE:
        if isinstance(node.get(name), dict):
            yield [name]


def _at(schema: Any, path: list[str]) -> Any:
    for key in path:
        schema = schema[int(key)] if isinstance(schema, list) else schema[key]
    return schema


def _replaced(schema: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    parent = _at(out, path[:-1])
    if isinstance(parent, list):
        parent[int(path[-1])] = value
    else:
        parent[path[-1]] = value
    return out


def _pointer(path: list[str]) -> str:
    return "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in path)


class Grammar:
    """A compiled grammar, shared by the requests that use it: `matcher()` gives each one its
    own state (a copy of a matcher built once, so a request costs no compilation)."""

    def __init__(self, template: Any, stop_ids: list[int]) -> None:
        self._template = template
        self._stop_ids = stop_ids

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self._stop_ids)


class GrammarMatcher:
    """One request's position in its grammar (astrai_serve.sampling.TokenMatcher): the sampling
    pipeline asks it which tokens may come next, the scheduler tells it which one came."""

    _executor: Any = None  # llguidance's thread pool, shared by all matchers

    def __init__(self, matcher: Any, stop_ids: list[int]) -> None:
        self._matcher = matcher
        self._stop_ids = stop_ids

    @staticmethod
    def fill_bitmasks(matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Rows 0..len(matchers) - 1 of `bitmask` at once (`fill_bitmask` of each), computed in
        llguidance's thread pool: several times faster than one call per row."""
        if GrammarMatcher._executor is None:
            GrammarMatcher._executor = _llguidance().LLExecutor()
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous()
        assert bitmask.device.type == "cpu"
        ready = [(m._matcher, j) for j, m in enumerate(matchers) if not m._matcher.is_error()]
        GrammarMatcher._executor.unsafe_compute_mask_ptr(
            ready, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
        for j, m in enumerate(matchers):
            if m._matcher.is_error():
                m.fill_bitmask(bitmask, j)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of an int32 (B, ceil(V / 32)) CPU bitmask: bit t of word t // 32 is set
        when token t may come next. A matcher in an error state (which sampling through its
        masks cannot reach) allows only the stop tokens, so the request ends."""
        words = bitmask[row]
        if self._matcher.is_error():
            words.zero_()
            for token in self._stop_ids:
                words[token // 32] |= 1 << (token % 32)
            return
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept(self, token_id: int) -> None:
        self._matcher.consume_token(int(token_id))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but a stop token could follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None
