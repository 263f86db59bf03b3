"""The engine's requests seen from an asyncio event loop: the one async streaming path, used by
`InferenceEngine.generate_async` and by the HTTP API.

The engine's step loop runs in its own thread and calls each `GenerateResult`'s listeners after
every change. A `WatchGroup` (the requests of one caller: an HTTP request's n choices or its
prompts) turns those calls into one wake-up of the event loop at a time, and each
`RequestWatch` hands out only what is new since it was last asked: text, token ids, logprobs
and, once, the finish reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from astrai_serve.request import GenerateResult, TokenLogprob
from astrai_serve.sampling import SamplingParams

if TYPE_CHECKING:
    from astrai_serve.engine import InferenceEngine


class LoopWaker:
    """Runs callbacks on the event loop on behalf of the step-loop thread, with one cross-thread
    call per batch of them: a step that advances 64 streams wakes the loop once, not 64 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._scheduled = False

    def wake(self, callback: Callable[[], None]) -> None:
        """Any thread. Never raises: an exception here would kill the engine's step loop."""
        with self._lock:
            self._pending.append(callback)
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening now
            self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for callback in pending:
            callback()


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # set once, on the last delta


class RequestWatch:
    """One engine request (one choice) of an HTTP request."""

    def __init__(self, index: int, result: GenerateResult) -> None:
        self.index = index
        self.result = result
        self.token_times: list[float] = []  # arrival time of each generated token, for metrics
        self.finished = False  # the finish reason was handed out
        self._tokens_sent = 0
        self._logprobs_sent = 0

    def stamp(self) -> None:
        """Called on the step-loop thread right after the engine appends a token."""
        while len(self.token_times) < self.result.generated_tokens:
            self.token_times.append(time.perf_counter())

    def take(self) -> Delta | None:
        """What arrived since the last call, or None if nothing did."""
        if self.finished:
            return None
        r = self.result
        done = r.done  # read first: once done, every piece and token is already in
        text = "".join(r.pop_all())
        token_ids = r.token_ids_since(self._tokens_sent)
        # The engine appends a token before its logprob: take only the logprobs already there.
        logprobs = r.logprobs_since(self._logprobs_sent)
        self._tokens_sent += len(token_ids)
        self._logprobs_sent += len(logprobs)
        self.finished = done
        if not (text or token_ids or logprobs or done):
            return None
        return Delta(text, token_ids, logprobs, r.finish_reason if done else None)


class WatchGroup:
    """The engine requests of one caller. `close()` (idempotent) aborts whatever is still
    running and hands the group to `on_close` (the API's metrics and admission accounting)."""

    def __init__(self, engine: InferenceEngine, waker: LoopWaker,
                 on_close: Callable[[WatchGroup], None] | None = None, reserved: int = 0) -> None:
        self.engine = engine
        self.reserved = reserved  # admission slots held until close
        self.watches: list[RequestWatch] = []
        self.closed = False
        self._on_close = on_close
        self._waker = waker
        self._changed = asyncio.Event()
        self._wake_pending = False

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestWatch:
        result = self.engine.submit(prompt_ids, params, text=True)
        watch = RequestWatch(len(self.watches), result)
        self.watches.append(watch)
        result.add_listener(lambda: self._progress(watch))
        self._changed.set()  # tokens may have arrived before the listener was attached
        return watch

    def _progress(self, watch: RequestWatch) -> None:
        """Step-loop thread. Must never raise: an exception here would kill the engine."""
        watch.stamp()
        if self._wake_pending:
            return  # a wake-up is already on its way and will see this change too
        self._wake_pending = True
        self._waker.wake(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        self._changed.set()

    async def deltas(self) -> AsyncIterator[tuple[RequestWatch, Delta]]:
        """Every delta of every watch, as they arrive, until all have finished."""
        while True:
            self._changed.clear()
            for watch in self.watches:
                delta = watch.take()
                if delta is not None:
                    yield watch, delta
            if all(w.finished for w in self.watches):
                return
            await self._changed.wait()

    async def wait(self) -> None:
        """Until every request has finished (reads nothing, so the results stay whole)."""
        while True:
            self._changed.clear()
            if all(w.result.done for w in self.watches):
                return
            await self._changed.wait()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for watch in self.watches:
            if not watch.result.done:
                with contextlib.suppress(RuntimeError):  # a stopped engine ended them all
                    self.engine.abort(watch.result.request_id)
        if self._on_close is not None:
            self._on_close(self)
