"""Log-probabilities in OpenAI's two formats: chat (`content: [{token, logprob, bytes,
top_logprobs}]`) and the legacy completions one (parallel lists)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from astrai_serve.request import TokenLogprob

FLOOR = -9999.0  # what OpenAI reports for an impossible token: JSON has no -Infinity
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the other
    bytes are shifted to code points from 256 up, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in printable)
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class TokenText:
    """The text and exact bytes of single tokens. A byte-level token can hold half a character,
    which no text can show, so `bytes` carries it exactly and the text escapes it."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend", None)
        byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._alphabet = _byte_level_alphabet() if byte_level else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            raw = self._raw_bytes(token_id)
            self._cache[token_id] = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
        return self._cache[token_id]

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.id_to_token(token_id) or ""
        if self._alphabet is not None and piece and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        if match := _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def chat_logprobs(entries: Sequence[TokenLogprob], text: TokenText) -> dict[str, Any]:
    content = []
    for entry in entries:
        token, raw = text(entry.token_id)
        top = [{"token": t, "logprob": finite(lp), "bytes": b}
               for (t, b), lp in ((text(tid), lp) for tid, lp in entry.top)]
        content.append({"token": token, "logprob": finite(entry.logprob), "bytes": raw,
                        "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], text: TokenText, offset: int = 0
                        ) -> tuple[dict[str, Any], int]:
    """The legacy object and the text offset after its last token (streams continue from it)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for entry in entries:
        token = text(entry.token_id)[0]
        out["tokens"].append(token)
        out["token_logprobs"].append(finite(entry.logprob))
        out["top_logprobs"].append({text(tid)[0]: finite(lp) for tid, lp in entry.top})
        out["text_offset"].append(offset)
        offset += len(token)
    return out, offset


def prompt_logprobs_legacy(prompt_ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                           text: TokenText) -> tuple[dict[str, Any], int]:
    """The echoed prompt in the legacy format: every prompt token, with null for the first
    token's logprob and top logprobs (nothing predicts it); and the offset after the prompt."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    offset = 0
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        token = text(token_id)[0]
        out["tokens"].append(token)
        out["token_logprobs"].append(None if entry is None else finite(entry.logprob))
        out["top_logprobs"].append(
            None if entry is None else {text(tid)[0]: finite(lp) for tid, lp in entry.top})
        out["text_offset"].append(offset)
        offset += len(token)
    return out, offset
