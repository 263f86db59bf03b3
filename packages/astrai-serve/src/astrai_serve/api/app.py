"""`create_app`: the FastAPI app of `astrai serve`, around an engine or a function that builds
one. Given a loader, the model loads in the background after startup, so `/health` answers 503
while it loads instead of the port refusing connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from astrai_serve.api import routes_chat, routes_completions, routes_info, routes_web
from astrai_serve.api.auth import APIKeyMiddleware
from astrai_serve.api.body_limit import BodyLimitMiddleware
from astrai_serve.api.errors import install_error_handlers
from astrai_serve.api.state import ServerConfig, ServingState
from astrai_serve.engine import InferenceEngine

EngineSource = InferenceEngine | Callable[[], InferenceEngine]


def create_app(
    engine_or_loader: EngineSource,
    config: ServerConfig | None = None,
    *,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app.

    Args:
        engine_or_loader: a ready `InferenceEngine` (the caller keeps it and shuts it down), or
            a function that builds one (the app owns it: shut down when the app stops).
        config: served name, API key, queue and body limits, the chat page on or off.
        on_load_error: called on the event loop if the loader fails (e.g. to stop the server).
    """
    state = ServingState(config or ServerConfig())
    app = FastAPI(title="AstrAI", version=version("astrai-serve"),
                  summary="OpenAI-compatible API of an AstrAI InferenceEngine.",
                  lifespan=_lifespan(state, engine_or_loader, on_load_error))
    app.state.serving = state
    install_error_handlers(app)
    for module in (routes_chat, routes_completions, routes_info):
        app.include_router(module.router)
    if state.config.web:
        routes_web.install(app)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    # The last middleware added runs first: authentication before the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.config.max_body_bytes)
    if state.config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=state.config.api_key)
    return app


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 for every body; this API answers 400 instead (see errors.py)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _lifespan(state: ServingState, source: EngineSource,
              on_load_error: Callable[[BaseException], None] | None):
    owned = not isinstance(source, InferenceEngine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = None
        if isinstance(source, InferenceEngine):
            state.set_engine(source)
        else:
            loading = asyncio.create_task(state.load(source, on_load_error))
        try:
            yield
        finally:
            state.stopping = True
            if loading is not None:
                await loading  # a load cannot be interrupted; let it end, then shut it down
            if owned and state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    return lifespan
