"""`ServerConfig` (what `astrai serve` was told) and `ServingState` (what the app knows now:
the engine once loaded, a load error, how many sequences are admitted, the grammar compiler, and
whether the server is draining for shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from astrai_serve.api.errors import APIError, bad_request, unavailable
from astrai_serve.api.logprobs import TokenText
from astrai_serve.api.metrics import Metrics
from astrai_serve.constrained import GrammarCompiler
from astrai_serve.engine import InferenceEngine
from astrai_serve.watch import LoopWaker, WatchGroup

logger = logging.getLogger("astrai.serve")

DRAIN_MARGIN_S = 2.0  # abort this long before the shutdown timeout, so answers can still end


@dataclass
class ServerConfig:
    served_model_name: str = "astrai"
    api_key: str | None = None  # required as a bearer token on /v1/* when set
    max_waiting: int = 256  # sequences that may wait beyond the running batch; more get 503
    max_body_bytes: int = 4 << 20
    retry_after_s: int = 1  # the Retry-After hint on 503 while busy or loading
    web: bool = True  # serve the chat page at GET /

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
        self._groups: set[WatchGroup] = set()  # open ones, aborted if the drain runs out
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = asyncio.Lock()

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
        if self.config.served_model_name in engine.adapter_names:
            raise ValueError(f"a LoRA adapter is named '{self.config.served_model_name}' like the "
                             "base model, so `model` could not tell them apart; rename it")
        self.token_text = TokenText(engine.tokenizer)
        self.engine = engine

    def model_names(self) -> tuple[str, ...]:
        """What a request may send as `model`: the base model's name, then its LoRA adapters'
        (known once the engine is loaded)."""
        adapters = self.engine.adapter_names if self.engine is not None else ()
        return (self.config.served_model_name, *adapters)

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

    def open_group(self, engine: InferenceEngine, sequences: int, param: str) -> WatchGroup:
        """Admit `sequences` more engine requests: 400 if they could never all be held at once
        (`param` names the field that asked for them), 503 + Retry-After when the batch and
        the waiting room are too full for them now."""
        capacity = engine.max_batch_size + self.config.max_waiting
        if sequences > capacity:
            raise bad_request(
                f"this request needs {sequences} sequences at once but the server holds at "
                f"most {capacity} ({engine.max_batch_size} running + {self.config.max_waiting} "
                "waiting, --max-batch-size and --max-waiting); send fewer prompts or a "
                "smaller n", param=param, code="too_many_sequences")
        room = capacity - self.in_flight
        if sequences > room:
            raise unavailable(f"the server is busy ({self.in_flight} sequences in flight); "
                              "retry shortly", "queue_full", self.config.retry_after_s)
        self.in_flight += sequences
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = LoopWaker(loop)
        group = WatchGroup(engine, self._waker, self._close_group, reserved=sequences)
        self._groups.add(group)
        return group

    def _close_group(self, group: WatchGroup) -> None:
        self._groups.discard(group)
        self.in_flight -= group.reserved
        for watch in group.watches:
            self.metrics.observe(watch.result, watch.token_times)

    # -- shutdown ------------------------------------------------------------------------------
    def drain(self, grace_s: float | None) -> None:
        """The server is stopping (SIGTERM, Ctrl-C): refuse new requests from now on, and abort
        the sequences still running shortly before uvicorn would cut their connections after
        `grace_s` seconds, so each answer still ends properly (a stream with an error event and
        `[DONE]`, a whole answer as a 503) instead of being cancelled mid-response."""
        self.stopping = True
        if grace_s is None:
            return  # no deadline: everything may finish
        margin = min(DRAIN_MARGIN_S, grace_s / 2)
        asyncio.get_running_loop().call_later(grace_s - margin, self._abort_open)

    def _abort_open(self) -> None:
        for group in list(self._groups):
            for watch in group.watches:
                if not watch.result.done:
                    with contextlib.suppress(RuntimeError):  # the engine already stopped
                        group.engine.abort(watch.result.request_id)

    # -- constrained decoding ------------------------------------------------------------------
    async def grammar_compiler(self, engine: InferenceEngine) -> GrammarCompiler:
        """The engine's grammar compiler, built on first use (a large vocabulary takes a
        second) in a worker thread. `GrammarUnavailable` if llguidance is not installed."""
        async with self._grammars_lock:
            if self._grammars is None:
                tokenizer = engine.tokenizer
                stop_ids = {*(getattr(tokenizer, "stop_ids", None) or [])}
                if getattr(tokenizer, "eos_id", None) is not None:
                    stop_ids.add(tokenizer.eos_id)
                vocab = int(engine.model.config.vocab_size)
                self._grammars = await asyncio.to_thread(GrammarCompiler, tokenizer, vocab,
                                                         sorted(stop_ids))
            return self._grammars
