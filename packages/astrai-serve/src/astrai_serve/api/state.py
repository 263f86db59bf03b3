"""`ServerConfig` (what `astrai serve` was told) and `ServingState` (what the app knows now:
the engine once loaded, a load error, and how many sequences are admitted)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from astrai_serve.api.errors import APIError, unavailable
from astrai_serve.api.logprobs import TokenText
from astrai_serve.api.metrics import Metrics
from astrai_serve.api.watch import LoopWaker, WatchGroup
from astrai_serve.engine import InferenceEngine

logger = logging.getLogger("astrai.serve")


@dataclass
class ServerConfig:
    served_model_name: str = "astrai"
    api_key: str | None = None  # required as a bearer token on /v1/* when set
    max_waiting: int = 256  # sequences that may wait beyond the running batch; more get 503
    max_body_bytes: int = 4 << 20
    retry_after_s: int = 1  # the Retry-After hint on 503 while busy or loading

    def __post_init__(self) -> None:
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty; give a non-empty key or none")


class ServingState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: InferenceEngine | None = None
        self.token_text: TokenText | None = None
        self.load_error: BaseException | None = None
        self.stopping = False
        self.in_flight = 0  # sequences admitted and not yet closed
        self.created = int(time.time())
        self.metrics = Metrics(lambda: self.engine)
        self._waker: LoopWaker | None = None

    async def load(self, loader: Callable[[], InferenceEngine],
                   on_error: Callable[[BaseException], None] | None) -> None:
        """Build the engine in a worker thread, so /health answers 503 meanwhile."""
        start = time.perf_counter()
        try:
            engine = await asyncio.to_thread(loader)
        except Exception as exc:
            self.load_error = exc
            logger.error("could not load the model: %s", exc)
            if on_error is not None:
                on_error(exc)
            return
        self.set_engine(engine)
        logger.info("model '%s' loaded in %.1f s; ready", self.config.served_model_name,
                    time.perf_counter() - start)

    def set_engine(self, engine: InferenceEngine) -> None:
        if engine.tokenizer is None:
            raise ValueError("the engine has no tokenizer; the HTTP API needs one for text")
        self.token_text = TokenText(engine.tokenizer)
        self.engine = engine

    def problem(self) -> APIError | None:
        """Why requests cannot be served now, or None."""
        retry = self.config.retry_after_s
        if self.stopping:
            return unavailable("the server is shutting down", "shutting_down")
        if self.load_error is not None:
            return unavailable(f"the model failed to load: {self.load_error}", "load_failed")
        if self.engine is None:
            return unavailable("the model is still loading; retry shortly", "loading", retry)
        if not self.engine.healthy:
            return unavailable("the engine failed and cannot serve; restart the server "
                               "(the log has the cause)", "engine_failed")
        return None

    def ready_engine(self) -> InferenceEngine:
        problem = self.problem()
        if problem is not None:
            raise problem
        assert self.engine is not None
        return self.engine

    def open_group(self, engine: InferenceEngine, sequences: int) -> WatchGroup:
        """Admit `sequences` more engine requests, or refuse with 503 + Retry-After when the
        batch and the waiting room are both full."""
        room = engine.max_batch_size + self.config.max_waiting - self.in_flight
        if sequences > room:
            raise unavailable(f"the server is busy ({self.in_flight} sequences in flight); "
                              "retry shortly", "queue_full", self.config.retry_after_s)
        self.in_flight += sequences
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = LoopWaker(loop)
        return WatchGroup(engine, sequences, self._waker, self._close_group)

    def _close_group(self, group: WatchGroup) -> None:
        self.in_flight -= group.reserved
        for watch in group.watches:
            self.metrics.observe(watch.result, watch.token_times)
