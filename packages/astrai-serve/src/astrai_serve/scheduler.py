"""`InferenceScheduler`: continuous batching over the paged KV cache.

Every step builds one batch under a token budget: first one token for each running task that is
decoding (oldest first), then chunks of prompts being prefilled, then newly admitted prompts, so
a long prompt is cut into chunks and never stalls the running streams (chunked prefill).

Batch layout. A mixed batch padded into one (B, T) tensor would compute T - 1 padding tokens
per decode row; separate forwards for decode rows and for each prefill chunk would read every
weight once per forward and run small GEMMs. So the runner packs all N scheduled tokens into
one row, (1, N): the linear layers (most of the compute) run once, on N real tokens. Attention
must not mix sequences, and a block-diagonal mask over the packed row would attend across the
whole batch, so the cache view (`PackedView`) returns itself as the core's `AttentionPlan` and
attends per sequence: decode rows in a few length groups, one SDPA each, and each prefill chunk
alone. lm_head runs only on the rows that sample.

When the pages run out, the newest running task not yet in this step's batch is preempted: its
pages are released (kept in the prefix cache when indexed) and it goes back to the front of the
queue to be recomputed; its output so far is kept, so nothing is lost or sent twice.

Threads: `add_task`/`remove_task`/`call` may come from any thread; they only append to a
locked inbox. One step-loop thread (`start`) owns the cache and the model. If a step raises,
every waiting and running request gets the error and `healthy` turns False.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from astrai_serve.adapters import ServedAdapters
from astrai_serve.batch import ScheduledBatch
from astrai_serve.kvcache import KVCache
from astrai_serve.model_runner import ModelRunner
from astrai_serve.request import TokenLogprob
from astrai_serve.sampling import SamplingPipeline, compute_logprobs
from astrai_serve.stats import EngineStats
from astrai_serve.task import Task, TaskStatus


class ContextLengthError(ValueError):
    """A prompt that fills the context window, leaving no room to generate."""


class InferenceScheduler:
    def __init__(
        self,
        model: nn.Module,
        kvcache: KVCache,
        max_batch_size: int = 64,
        max_num_tokens: int = 1024,
        max_seq_len: int | None = None,
        adapters: ServedAdapters | None = None,
    ) -> None:
        if max_num_tokens < max_batch_size:
            raise ValueError(f"max_num_tokens ({max_num_tokens}) must be >= max_batch_size "
                             f"({max_batch_size}) so every running stream decodes each step")
        self.model = model
        self.page_cache = kvcache
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        model_len = getattr(getattr(model, "config", None), "max_seq_len", None) or 1 << 30
        self.max_seq_len = min(max_seq_len or model_len, model_len, kvcache.capacity_tokens)
        self.waiting_queue: deque[Task] = deque()
        self.active_tasks: list[Task] = []  # running, in admission order
        self.runner = ModelRunner(model, kvcache, adapters)
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- any thread --------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Refuse a prompt that cannot be served: `ValueError` if empty, `ContextLengthError`
        if it leaves no room in the context window to generate a token."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if n >= self.max_seq_len:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context window is {self.max_seq_len} tokens "
                "(the least of the model's max_seq_len, the engine's max_seq_len and the KV "
                "cache size), leaving no room to generate; shorten the prompt")

    def add_task(self, task: Task) -> str:
        self._check_fits(task)
        self._post("add", task)
        return task.task_id

    def add_tasks(self, tasks: list[Task]) -> None:
        """Queue several tasks at once: the step loop sees all of them at the same step boundary,
        so the steps they run in (and so their numerics) do not depend on thread timing."""
        for task in tasks:
            self._check_fits(task)
        self._post("add_many", list(tasks))

    def remove_task(self, task_id: str) -> None:
        """Abort a task (client gone); its pages are freed at the next step boundary."""
        self._post("abort", task_id)

    def call(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the step loop between two steps and wait for it."""
        done = threading.Event()
        box: list[BaseException] = []
        self._post("call", (fn, done, box))
        while not done.wait(0.05):
            if not self.healthy or self._thread is None or not self._thread.is_alive():
                self._drain_inbox()  # no loop to run it: run it here (the cache is idle)
        if box:
            raise box[0]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="astrai-step-loop", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._drain_inbox()
        for task in [*self.waiting_queue, *self.active_tasks]:
            self._finish(task, "abort", TaskStatus.ABORTED)

    def has_work(self) -> bool:
        return bool(self.waiting_queue or self.active_tasks)

    # -- the step loop ----------------------------------------------------------------------
    def step(self) -> list[Task]:
        """One engine step: schedule, run the model, post-process. Returns finished tasks."""
        self._drain_inbox()
        batch = self.schedule()
        if batch.empty:
            return []
        start = time.perf_counter()
        logits = self.runner.run(batch)
        finished = self._postprocess(batch, logits)
        self.stats.record_step(batch.num_tokens, len(batch.sampling_tasks()), time.perf_counter() - start)
        return finished

    def schedule(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(), self.max_num_tokens
        decoding = [t for t in self.active_tasks if t.remaining == 1]
        prefilling = [t for t in self.active_tasks if t.remaining > 1]
        for task in decoding + prefilling:
            n = min(task.remaining, budget)
            if task.status is TaskStatus.RUNNING and n > 0 and self._reserve(task, n, batch):
                batch.add(task, n)
                budget -= n
        while self.waiting_queue and budget > 0 and len(self.active_tasks) < self.max_batch_size:
            task = self.waiting_queue[0]
            n = self._admit(task, budget)
            if n == 0:
                break  # not enough pages for its first chunk; retry when some are freed
            self.waiting_queue.popleft()
            batch.add(task, n)
            budget -= n
        return batch

    def _admit(self, task: Task, budget: int) -> int:
        """Give a waiting task its page table and first chunk's pages; 0 if pages are short."""
        cached = self.page_cache.task_alloc(task.task_id, task.token_ids, namespace=task.adapter)
        task.num_computed = cached
        n = min(task.remaining, budget)
        if not self.page_cache.task_extend(task.task_id, cached + n):
            self.page_cache.task_free(task.task_id)
            task.num_computed = 0
            return 0
        if not task.admitted:  # a recomputation after preemption is not a prefix-cache saving
            task.cached_tokens, task.admitted = cached, True
            self.stats.record_admission(task)
        task.status = TaskStatus.RUNNING
        self.active_tasks.append(task)
        return n

    def _reserve(self, task: Task, n: int, batch: ScheduledBatch) -> bool:
        """Pages for `n` more tokens of a running task, preempting the newest tasks not yet in
        this batch until they fit; False if the task itself had to be preempted."""
        while not self.page_cache.task_extend(task.task_id, task.num_computed + n):
            victim = next(t for t in reversed(self.active_tasks) if t not in batch)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is task:
                return False
        return True

    def _preempt(self, task: Task) -> None:
        self.page_cache.task_free(task.task_id)
        self.active_tasks.remove(task)
        task.num_computed = 0
        task.status = TaskStatus.PENDING
        self.waiting_queue.appendleft(task)
        self.stats.preemptions += 1

    def _postprocess(self, batch: ScheduledBatch, logits: torch.Tensor | None) -> list[Task]:
        for task, n in batch.scheduled():
            task.num_computed += n
            self.page_cache.task_record_hashes(task.task_id, task.token_ids, task.num_computed)
        tasks = batch.sampling_tasks()
        if logits is None:
            return []
        token_ids, logprobs = self._sample(tasks, logits)
        finished = []
        for task, token_id, logprob in zip(tasks, token_ids, logprobs, strict=True):
            reason = self._append(task, token_id, logprob)
            if reason is not None:
                self._finish(task, reason, TaskStatus.FINISHED)
                finished.append(task)
        return finished

    def _sample(self, tasks: list[Task], logits: torch.Tensor) -> tuple[list[int], list[Any]]:
        params = [t.params for t in tasks]
        prompts: list[list[int]] = []
        outputs: list[list[int]] = []
        if any(p.needs_penalties for p in params):  # copying every output each step is O(length)
            prompts, outputs = [t.prompt_ids for t in tasks], [t.output_ids for t in tasks]
        constrained = any(t.matcher is not None for t in tasks)
        matchers = [t.matcher for t in tasks] if constrained else ()
        pipeline = SamplingPipeline.from_params(params, prompts, outputs, matchers)
        chosen = pipeline.sample(logits, [t.generator for t in tasks])
        logprobs = compute_logprobs(logits, chosen, [p.logprobs for p in params])
        return chosen.tolist(), logprobs

    def _append(self, task: Task, token_id: int, logprob: Any) -> str | None:
        if task.matcher is not None:  # grammar-constrained: the grammar moves past the token
            task.matcher.accept(token_id)
        task.append(token_id, TokenLogprob(token_id, *logprob) if logprob is not None else None)
        return task.is_finished(token_id)

    def _finish(self, task: Task, reason: str, status: TaskStatus) -> None:
        if task in self.active_tasks:
            self.active_tasks.remove(task)
            self.page_cache.task_free(task.task_id)
        elif task in self.waiting_queue:
            self.waiting_queue.remove(task)
        task.finish(reason, status)
        self.stats.record_finish(task)

    # -- inbox and loop ---------------------------------------------------------------------
    def _post(self, kind: str, payload: Any) -> None:
        with self._wake:
            if self.error is not None:
                raise RuntimeError(f"the engine is unhealthy after an error: {self.error!r}")
            if self._stopping:
                raise RuntimeError("the engine has been shut down")
            self._inbox.append((kind, payload))
            self._wake.notify_all()

    def _drain_inbox(self) -> None:
        with self._wake:
            items, self._inbox = list(self._inbox), deque()
        for kind, payload in items:
            if kind == "add":
                self.waiting_queue.append(payload)
            elif kind == "add_many":
                self.waiting_queue.extend(payload)
            elif kind == "abort":
                self._abort(payload)
            else:
                fn, done, box = payload
                try:
                    fn()
                except Exception as exc:  # handed back to the caller of `call`
                    box.append(exc)
                done.set()

    def _abort(self, task_id: str) -> None:
        for task in [*self.active_tasks, *self.waiting_queue]:
            if task.task_id == task_id:
                self._finish(task, "abort", TaskStatus.ABORTED)
                return

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._inbox or self.has_work() or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        return
                steps = self.stats.steps
                self.step()
                if self.stats.steps == steps and self.has_work():
                    with self._wake:  # nothing could be scheduled: wait for a change, do not spin
                        self._wake.wait(0.01)
        except BaseException as exc:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        with self._wake:
            self.error = exc
            items, self._inbox = list(self._inbox), deque()
        tasks = [*self.waiting_queue, *self.active_tasks]
        tasks += [p for kind, p in items if kind == "add"]
        tasks += [t for kind, p in items if kind == "add_many" for t in p]
        self.waiting_queue.clear()
        self.active_tasks.clear()
        for task in tasks:
            task.fail(exc)
        for kind, payload in items:
            if kind == "call":
                payload[2].append(RuntimeError(f"the engine died: {exc!r}"))
                payload[1].set()

    def _check_fits(self, task: Task) -> None:
        self.check_prompt(task.prompt_ids)
        task.max_seq_len = min(task.max_seq_len, self.max_seq_len)

    def get_stats(self) -> dict[str, Any]:
        pages = self.page_cache.page_counts()
        return {
            "healthy": self.healthy,
            "running": len(self.active_tasks),
            "waiting": len(self.waiting_queue) + len(self._inbox),
            "kv_pages_used": pages["used"], "kv_pages_free": pages["free"],
            "kv_pages_cached": pages["cached"], "kv_pages_total": pages["total"],
            **self.stats.as_dict(),
        }
