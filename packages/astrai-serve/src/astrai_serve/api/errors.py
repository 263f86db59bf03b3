"""OpenAI-style errors: every failure leaves the server as `{"error": {"message", "type", "param",
"code"}}` with the right status, never as FastAPI's `{"detail": ...}` or a bare 500 page.

FastAPI reports a malformed body as 422; OpenAI clients expect 400, so validation errors are
rewritten here, with `param` naming the offending field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

logger = logging.getLogger("astrai.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 501: "server_error", 503: "server_error"}


class OpenAIJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate sent by a client (valid JSON, invalid UTF-8)
    and echoed back in a message becomes U+FFFD instead of crashing the response."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", errors="replace")


class APIError(Exception):
    """An error for the client, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        return OpenAIJSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str, retry_after_s: int | None = None) -> APIError:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return APIError(503, message, code=code, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple[Any, ...]) -> list[str]:
    """The field path of a pydantic error location, without "body" and without the tags
    pydantic adds for union members (`constrained-str`, `list[int]`)."""
    path = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        tag = isinstance(part, str) and (not part.isidentifier() or part in _TYPE_TAGS)
        if not tag:
            path.append(str(part))
    return path


def validation_error(exc: RequestValidationError) -> APIError:
    """One readable sentence with `param` naming the field. A value that fits no member of a
    union fails once per member; the deepest failure is the one that says what is wrong (for
    `stop: [""]`, "too short" rather than "not a string")."""
    errors = list(exc.errors())
    if not errors:
        return bad_request("the request body is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "invalid JSON")
        return bad_request(f"the request body is not valid JSON: {detail}", code="invalid_json")
    worst = max(errors, key=lambda e: len(e.get("loc", ())))
    path = _field_path(tuple(worst.get("loc", ())))
    if worst.get("type") == "missing" and not path:
        return bad_request("the request body is missing; send a JSON object")
    param = ".".join(path) or None
    message = str(worst.get("msg", "invalid value")).removeprefix("Value error, ")
    return bad_request(f"{param}: {message}" if param else message, param=param,
                       code="invalid_value")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc).response()


async def _http(request: Request, exc: Exception) -> Response:
    """404 (unknown path), 405 (wrong method) and friends, in OpenAI's shape."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    return APIError(exc.status_code, message, headers=headers).response()


async def _internal(request: Request, exc: Exception) -> Response:
    """A bug, not a client error: log the traceback, answer with the OpenAI body."""
    logger.exception("internal error on %s %s", request.method, request.url.path)
    return APIError(500, "internal server error; the server log has the details",
                    type="server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)
