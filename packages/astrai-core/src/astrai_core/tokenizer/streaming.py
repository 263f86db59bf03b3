"""`IncrementalDecoder`: turn a stream of token ids into text, one token at a time.

Byte-level tokenizers split a Chinese character (3 UTF-8 bytes) or an emoji (4 bytes) across
tokens; decoding such a token alone yields U+FFFD. The decoder therefore holds text back while
the decoded window ends in U+FFFD, and emits it once the character is complete.

Cost per token is constant: only a short window is decoded, never the whole sequence. The window
is `context + unread` tokens: the context (the tokens emitted last) is re-decoded beside the new
tokens so that decoders which treat the first token specially (SentencePiece strips its leading
space) give the same text as a full decode, and the new text is what the window adds beyond it.

Why not `tokenizers.decoders.DecodeStream` (checked with tokenizers 0.23.3, on the fixtures of
tests/core/test_streaming_decode.py): it gives the same pieces for byte-level BPE whose tokens
straddle characters, Chinese split over several tokens, SentencePiece byte fallback, and
skip_special_tokens on or off; but
- it holds bytes that never become a character forever: 24 lone UTF-8 continuation bytes then
  "ok" return None 24 times and come out only with "o", while its window (re-decoded each step)
  keeps growing. A model can sample such bytes; we release them after MAX_PENDING_TOKENS.
- it has no flush: for "a" plus the first two bytes of "中" it returns "a", None and the U+FFFD
  that `decode` gives is lost, so the streamed text differs from the full decode.
- it needs a `tokenizers.Tokenizer`; this takes anything with `decode` (AutoTokenizer, doubles).
Its `step` does not expose the ids it holds, so a wrapper cannot add either missing behaviour
without keeping its own window, which is this class.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"

# A UTF-8 character is at most 4 bytes, so a window still ending in U+FFFD after this many unread
# tokens holds genuinely invalid bytes (a model can sample those); emit them instead of waiting.
MAX_PENDING_TOKENS = 8


class Decodes(Protocol):
    """Anything with `decode(ids, skip_special_tokens)`: AutoTokenizer or a `tokenizers.Tokenizer`."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDecoder:
    """Feed ids with `step`, get back the newly completed text; `flush` at the end of the stream."""

    def __init__(self, tokenizer: Decodes, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._window: list[int] = []  # context tokens, then unread tokens
        self._context = 0  # window[:_context] is already emitted and only there for context
        self._context_text = ""  # decode(window[:_context])
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "" while a character is split)."""
        self._window.append(int(token_id))
        window_text = self._decode(self._window)
        pending = len(self._window) - self._context
        if window_text.endswith(REPLACEMENT_CHAR) and pending < MAX_PENDING_TOKENS:
            return ""  # the last character is still incomplete: wait for its remaining bytes
        new_text = window_text[len(self._context_text):]
        # The unread tokens become the next context; older context is dropped.
        self._window = self._window[self._context:]
        self._context = len(self._window)
        self._context_text = self._decode(self._window)
        return self._emit(new_text)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD) and reset."""
        new_text = self._decode(self._window)[len(self._context_text):]
        self._window, self._context, self._context_text = [], 0, ""
        return self._emit(new_text)

    def _emit(self, new_text: str) -> str:
        if new_text:
            self._pieces.append(new_text)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""
