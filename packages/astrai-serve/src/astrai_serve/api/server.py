"""`serve`: run an app under uvicorn until SIGTERM or Ctrl-C, then shut down cleanly.

On the signal uvicorn stops accepting connections and lets requests in flight finish for up to
`shutdown_timeout` seconds. `DrainingServer` tells the app when that starts, so the app aborts
what is still running just before the timeout and every answer ends properly (an error event
and `[DONE]` for a stream, a 503 for a whole answer) instead of being cancelled mid-response by
uvicorn; then the app's lifespan shuts the engine down. uvicorn re-raises the signal once it
is done, to the handler that was installed before it started; a no-op one is installed here,
so a requested shutdown ends the process with exit code 0, not as killed by the signal.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that starts the app's drain (`ServingState.drain`) when it shuts down,
    whether a signal or `should_exit` asked for it."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "serving", None)
        if state is not None:
            state.drain(self.config.timeout_graceful_shutdown)
        await super().shutdown(sockets)


@contextlib.contextmanager
def _signals_end_quietly() -> Iterator[None]:
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _log_like_uvicorn(level: str) -> None:
    """Our messages (model loaded, load failed) in uvicorn's format, beside its own."""
    from uvicorn.logging import DefaultFormatter

    logger = logging.getLogger("astrai.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def serve(
    build_app: Callable[[Callable[[BaseException], None]], FastAPI],
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve the app `build_app(on_fatal)` returns; `on_fatal(exc)` stops the server and makes
    this function raise `exc` (a model that fails to load ends the process with its error)."""
    fatal: list[BaseException] = []
    holder: list[uvicorn.Server] = []

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        holder[0].should_exit = True

    _log_like_uvicorn(log_level)
    config = uvicorn.Config(build_app(on_fatal), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout, access_log=False)
    holder.append(DrainingServer(config))
    with _signals_end_quietly():
        holder[0].run()
    if fatal:
        raise fatal[0]
    if not holder[0].started:
        raise OSError(f"could not start the server on {host}:{port} (is the port in use?)")
