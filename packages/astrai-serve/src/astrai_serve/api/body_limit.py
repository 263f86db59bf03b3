"""413 for a request body over the limit, in OpenAI's error shape.

The body is read up to the limit before the app runs (a declared Content-Length over it is
refused without reading anything) and replayed to the app, so a chunked upload cannot slip
past it either. Bodies here are JSON of at most a few MiB, so holding one in memory is fine.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from astrai_serve.api.errors import APIError


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body, disconnected = await self._read(receive)
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, self._replay(body, disconnected, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, bool]:
        """(body, client gone); body None when it is over the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    @staticmethod
    def _replay(body: bytes, disconnected: bool, receive: Receive) -> Receive:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            if disconnected:
                return {"type": "http.disconnect"}
            return await receive()  # after the body: wait for the client to leave

        return replay

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"the request body is over {self.max_bytes} bytes",
                         code="request_too_large")
        await error.response()(scope, receive, send)
