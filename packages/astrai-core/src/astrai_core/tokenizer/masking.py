"""Which tokens of a rendered conversation are assistant replies: the loss mask for SFT.

Works for any template without special markup: for each assistant message, the conversation is
rendered up to just before it (with the generation prompt, so the assistant header is included)
and up to just after it. The difference between the two is that reply; it is masked from its first
character through the end-of-turn token that closes it. The pieces are tokenized separately, so
the boundary falls exactly where generation starts at inference (after the prompt's last token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Render = Callable[[list[dict[str, Any]], bool], str]  # (messages, add_generation_prompt) -> text
EncodeBatch = Callable[[list[str]], list[list[int]]]


def assistant_spans(render: Render, messages: list[dict[str, Any]], end_markers: Sequence[str],
                    template_name: str = "chat template") -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the character span of each assistant reply in it."""
    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(messages[:index], True)
        after = render(messages[: index + 1], False)
        if not (full.startswith(before) and full.startswith(after) and len(before) <= len(after)):
            raise ValueError(
                f"{template_name} is not prefix-stable at message {index}: rendering the conversation "
                "up to that reply does not give a prefix of the whole, so assistant tokens cannot be "
                "located (templates that rewrite earlier turns do this, e.g. dropping past reasoning). "
                "Use a template that renders each turn independently of the later ones.")
        start = len(before)
        spans.append((start, _reply_end(full, start, len(after), end_markers)))
    return full, spans


def _reply_end(full: str, start: int, stop: int, end_markers: Sequence[str]) -> int:
    """End of the reply: just after the last end-of-turn marker inside it, so the marker is trained
    (the model must learn to stop) but separators after it (ChatML's newline) are not."""
    region = full[start:stop]
    ends = [region.rfind(m) + len(m) for m in end_markers if m and region.rfind(m) >= 0]
    return start + max(ends) if ends else stop


def ids_and_mask(text: str, spans: list[tuple[int, int]], encode_batch: EncodeBatch
                 ) -> tuple[list[int], list[int]]:
    """Tokenize `text` piece by piece at the span boundaries; mask is 1 on tokens inside spans."""
    pieces: list[tuple[str, int]] = []
    cursor = 0
    for start, end in spans:
        pieces += [(text[cursor:start], 0), (text[start:end], 1)]
        cursor = end
    pieces.append((text[cursor:], 0))
    pieces = [(piece, flag) for piece, flag in pieces if piece]
    ids: list[int] = []
    mask: list[int] = []
    for piece_ids, (_, flag) in zip(encode_batch([p for p, _ in pieces]), pieces, strict=True):
        ids += piece_ids
        mask += [flag] * len(piece_ids)
    return ids, mask
