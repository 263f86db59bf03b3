"""`AutoTokenizer`: a `tokenizers` pipeline plus special tokens and a chat template.

It reads and writes the Hugging Face folder layout (see `hf_folder`), so a tokenizer trained here
loads in `transformers` and a Hugging Face tokenizer folder loads here as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from astrai_core.tokenizer.chat_template import (
    ChatTemplate,
    normalize_messages,
)
from astrai_core.tokenizer.hf_folder import read_folder, write_folder
from astrai_core.tokenizer.masking import assistant_spans, ids_and_mask
from astrai_core.tokenizer.special_tokens import END_OF_TURN_TOKENS, named_tokens
from astrai_core.tokenizer.streaming import IncrementalDecoder

# The parts of tokenizer.json that decide which ids a text gets (not the decoder or post-processor).
_FINGERPRINT_KEYS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


class AutoTokenizer:
    """Encode, decode, chat templates and streaming decode over a `tokenizers.Tokenizer`.

    `special_tokens` maps Hugging Face names (`bos_token`, `eos_token`, `pad_token`, ...) to token
    strings; `extra_stop_ids` adds ids generation must also stop on (generation_config.json).
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: Mapping[str, str] | None = None,
                 chat_template: str | None = None, extra_stop_ids: Iterable[int] = (),
                 config: Mapping[str, Any] | None = None, name: str = "tokenizer") -> None:
        self._tk = tokenizer
        self._name = name
        self._config = dict(config or {})  # tokenizer_config.json keys we keep but do not interpret
        self._named = dict(special_tokens or {})
        self._template = self._build_template(chat_template)
        self._fingerprint: str | None = None
        self.bos_id: int | None = self._named_id("bos_token")
        self.stop_ids: list[int] = self._find_stop_ids(extra_stop_ids)
        eos = self._named_id("eos_token")
        self.eos_id: int | None = eos if eos is not None else next(iter(self.stop_ids), None)
        self.pad_id: int | None = self._named_id("pad_token")

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> AutoTokenizer:
        """Load a tokenizer folder (ours, or a Hugging Face one with tokenizer.json)."""
        folder = read_folder(path)
        return cls(folder.tokenizer, special_tokens=named_tokens(folder.config),
                   chat_template=folder.chat_template, extra_stop_ids=folder.generation_eos_ids,
                   config=folder.config, name=str(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AutoTokenizer:
        """Same as `from_pretrained` (the seed's name)."""
        return cls.from_pretrained(path)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json into `path`, each file atomically."""
        config = {**self._config, **self._named, "chat_template": self.chat_template}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        # Our decoders are exact; transformers' legacy clean-up would remove spaces before punctuation.
        config.setdefault("clean_up_tokenization_spaces", False)
        write_folder(Path(path), self._tk.to_str(pretty=True), config)

    # ---- encoding and decoding ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, the tokenizer's post-processor adds its
        markers (ours prepends `<|begin_of_text|>`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; use encode_batch for a list")
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust backend."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of str; use encode for a single text")
        # The fast path (tokenizers >= 0.21) skips character offsets, which nothing here needs.
        encode = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        encodings = encode(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self._tk.decode_batch([_as_id_list(ids) for ids in batch],
                                     skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder for one generated sequence that emits only complete characters."""
        return IncrementalDecoder(self._tk, skip_special_tokens=skip_special_tokens)

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added special tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens, e.g. `{"bos_token": "<|begin_of_text|>", ...}`."""
        return dict(self._named)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tk

    def fingerprint(self) -> str:
        """sha256 of what decides tokenization (vocabulary, merges, special tokens, normalizer and
        pre-tokenizer), independent of formatting: data files record it to detect a mismatch."""
        if self._fingerprint is None:
            data = json.loads(self._tk.to_str())
            payload = {key: data.get(key) for key in _FINGERPRINT_KEYS}
            canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    # ---- chat ---------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        return self._template.template_str

    def set_chat_template(self, template: str) -> None:
        """Replace the chat template (checked now: a syntax error raises ChatTemplateError)."""
        self._template = ChatTemplate.from_string(template)

    def apply_chat_template(self, messages: Sequence[Any], add_generation_prompt: bool = True,
                            tokenize: bool = True, tools: list[dict[str, Any]] | None = None,
                            system_prompt: str | None = None, **extra: Any) -> str | list[int]:
        """Render `messages` with the chat template; token ids when `tokenize`, else the text.

        `extra` reaches the template as variables (e.g. `enable_thinking=False`), overriding the
        special-token variables (`bos_token`, ...) as in Hugging Face."""
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        text = self._render(messages, add_generation_prompt, tools, system_prompt, extra)
        return self.encode(text) if tokenize else text

    def apply_chat_template_with_mask(self, messages: Sequence[Any],
                                      tools: list[dict[str, Any]] | None = None,
                                      system_prompt: str | None = None, **extra: Any
                                      ) -> tuple[list[int], list[int]]:
        """Ids of the whole conversation and a 0/1 mask that is 1 exactly on each assistant reply
        and the end-of-turn token closing it (what SFT trains on)."""
        if not messages:
            raise ValueError("apply_chat_template_with_mask needs at least one message")
        chat = normalize_messages(messages, self._template.name)
        if system_prompt is not None and chat[0]["role"] != "system":
            # Fixed once here, so every prefix rendered below starts the same way.
            chat.insert(0, {"role": "system", "content": system_prompt})
        markers = [m for m in (self.id_to_token(i) for i in self.stop_ids) if m]
        full, spans = assistant_spans(
            lambda msgs, gen: self._render(msgs, gen, tools, None, extra),
            chat, markers, self._template.name)
        return ids_and_mask(full, spans, self.encode_batch)

    def _render(self, messages: Sequence[Any], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None, system_prompt: str | None,
                extra: Mapping[str, Any]) -> str:
        variables = {**self._named, **extra}
        return self._template.render(messages, system_prompt=system_prompt, tools=tools,
                                     add_generation_prompt=add_generation_prompt, **variables)

    # ---- construction helpers -----------------------------------------------------------------

    def _build_template(self, template: str | None) -> ChatTemplate:
        if template is None:  # folders without a template chat in our ChatML format
            return ChatTemplate.default()
        return ChatTemplate.from_string(template, name=f"chat template of {self._name}")

    def _named_id(self, key: str) -> int | None:
        token = self._named.get(key)
        return self._tk.token_to_id(token) if token is not None else None

    def _find_stop_ids(self, extra_stop_ids: Iterable[int]) -> list[int]:
        """eos, generation_config's eos ids, then end-of-turn tokens this vocabulary has as
        special tokens; in that order, without repeats."""
        specials = {t.content: i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
        found = [self._named_id("eos_token"), *extra_stop_ids,
                 *(specials.get(token) for token in END_OF_TURN_TOKENS)]
        return list(dict.fromkeys(int(i) for i in found if i is not None))

    def __repr__(self) -> str:
        return (f"AutoTokenizer({self._name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, stop_ids={self.stop_ids})")


def _as_id_list(ids: Sequence[int] | Any) -> list[int]:
    """Accept lists, tuples, and tensors or arrays (via `tolist`)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
