"""Incremental text for one request: decode token by token, cut at the first stop string, and
hold back a tail that could still grow into a stop string, so streamed text never has to be
taken back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class IncrementalDecoder(Protocol):
    def step(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextOutput:
    def __init__(self, decoder: IncrementalDecoder, stop: Sequence[str] = ()) -> None:
        self._decoder = decoder
        self._stop = list(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self._sent = 0  # characters of `text` already handed out
        self._searched = 0  # stop strings cannot start before this offset
        self.stopped = False

    @property
    def n_released(self) -> int:
        """Characters of `text` handed out so far (they are final)."""
        return self._sent

    def released(self, start: int = 0) -> str:
        """The text handed out so far, from character `start` on. Safe to call from another
        thread while the step loop writes: `_sent` is read first, and `text` only ever changes
        beyond that offset."""
        sent = self._sent
        return self.text[start:sent]

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to emit."""
        self.text += self._decoder.step(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """The request ended for another reason: decode what is pending and release it all."""
        if not self.stopped:
            self.text += self._decoder.flush()
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = self._find_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self._sent)
        piece, self._sent = self.text[self._sent : end], end
        return piece

    def _find_stop(self) -> int | None:
        if not self._stop:
            return None
        hits = [i for s in self._stop if (i := self.text.find(s, self._searched)) >= 0]
        self._searched = max(0, len(self.text) - self._longest_stop + 1)
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
