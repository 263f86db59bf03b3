"""Server-sent events in OpenAI's format: `data: {json}\\n\\n` per chunk, `data: [DONE]` last."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


# Characters JSON may carry raw that Python's str.splitlines (and so httpx's `iter_lines`) and
# JavaScript treat as line breaks: a token decoding to one of them split its event in two for
# such clients. Escaped, the JSON means the same and every event stays on one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).translate(_LINE_BREAKS)


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(payload).encode("utf-8", errors="replace") + b"\n\n"


class ChunkEncoder:
    """Events `{**head, "choices": [choice], **tail}` of one stream, with head and tail (id,
    model, ...) encoded once instead of once per token."""

    def __init__(self, head: dict[str, Any], tail: dict[str, Any]) -> None:
        self._open = _dumps(head)[:-1] + ',"choices":['
        self._close = "]" + ("," + _dumps(tail)[1:-1] if tail else "") + "}"

    def __call__(self, choice: dict[str, Any]) -> bytes:
        text = self._open + _dumps(choice) + self._close
        return b"data: " + text.encode("utf-8", errors="replace") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """An SSE response that notices a client leaving even while no event is due.

    Starlette (for ASGI servers of spec 2.4, as uvicorn) only notices a disconnect when a send
    fails, so a stream waiting in the queue, or between tokens, would keep its KV pages. Here
    the stream and a disconnect listener run side by side and the first to end cancels the
    other; `on_close` then runs whatever happened, even if the stream never started.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client left during a send
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                async def listen() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(listen)
        finally:
            self._on_close()
            await self._close_iterator()

    async def _close_iterator(self) -> None:
        close = getattr(self.body_iterator, "aclose", None)
        if close is not None:
            try:
                with anyio.CancelScope(shield=True):
                    await close()
            except Exception:  # closing a generator that failed re-raises nothing useful
                pass
