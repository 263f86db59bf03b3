"""Bearer-token authentication for `/v1/*` when the server has an API key.

A pure ASGI middleware rather than a FastAPI dependency, so an unauthenticated client gets 401
before anything else happens (its body is not even read, let alone validated). `/health` and
`/metrics` stay open for probes and scrapers, as in vLLM, and so does the chat page (it asks for
the key and sends it with its own requests). The scheme name is case-insensitive (RFC 7235,
section 2.1): `bearer KEY` is as good as `Bearer KEY`; the key itself is compared exactly.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from astrai_serve.api.errors import APIError

PROTECTED_PREFIX = "/v1/"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX)
        if protected and not self._authorized(scope):
            error = APIError(401, "invalid or missing API key; send the header "
                             "'Authorization: Bearer <key>'", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self._expected)  # constant time
