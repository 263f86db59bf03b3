"""`KVCache`: tasks' page tables over a `PagePool` and a `Storage`, and the per-forward views
(`KvcacheView`, `PackedView`) that implement astrai-core's `PagedCache` protocol over them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from astrai_core import KVSpec
from astrai_serve.kvcache.packed_view import PackedView, Segment
from astrai_serve.kvcache.page_pool import PagePool
from astrai_serve.kvcache.prefix_cache import NO_PARENT
from astrai_serve.kvcache.storage import Storage, pages_for_budget
from astrai_serve.kvcache.task_table import TaskId, TaskTable
from astrai_serve.kvcache.view import KvcacheView


class KVCache:
    def __init__(
        self,
        spec: KVSpec,
        n_layers: int,
        page_size: int = 16,
        max_tokens: int | None = None,
        max_bytes: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        enable_prefix_cache: bool = True,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        n_pages = pages_for_budget(spec, n_layers, page_size, dtype, max_tokens, max_bytes)
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self._storage = Storage(spec, n_layers, n_pages, page_size, dtype, device)
        self._pool = PagePool(n_pages, page_size)
        self._table = TaskTable()

    @property
    def n_pages(self) -> int:
        return self._pool.n_pages

    @property
    def capacity_tokens(self) -> int:
        return self.n_pages * self.page_size

    @property
    def storage(self) -> Storage:
        return self._storage

    @property
    def pool(self) -> PagePool:
        return self._pool

    def page_counts(self) -> dict[str, int]:
        a = self._pool.allocator
        return {"used": a.n_used, "free": a.n_free, "cached": a.n_cached, "total": a.n_pages}

    # -- task life cycle ------------------------------------------------------------------
    def task_alloc(self, task_id: TaskId, token_ids: Sequence[int], namespace: int = 0) -> int:
        """Open a page table for a task about to compute `token_ids`, starting from the longest
        prefix cached under `namespace` (the LoRA adapter the task runs with; 0: the base), so
        K/V computed by other weights are never reused. Returns how many tokens are already
        computed (always fewer than all of them, so the last token's logits get computed)."""
        pages: list[int] = []
        if self.enable_prefix_cache:
            hits = self._pool.lookup(token_ids, namespace)
            pages = hits[: (len(token_ids) - 1) // self.page_size]
            for idx in pages:
                self._pool.inc_ref(idx)
        cached = len(pages) * self.page_size
        self._table.set(task_id, pages, cached, recorded=len(pages), namespace=namespace)
        return cached

    def task_extend(self, task_id: TaskId, n_tokens: int) -> bool:
        """Make room for the first `n_tokens` tokens of the task; False (nothing allocated) if
        the pool cannot supply the pages."""
        pages = self._table.get(task_id)
        need = -(-n_tokens // self.page_size) - len(pages)
        if need <= 0:
            return True
        if need > self._pool.available():
            return False
        pages.extend(self._pool.alloc() for _ in range(need))
        return True

    def task_free(self, task_id: TaskId) -> None:
        """Release the task's pages, last page first: a sequence's deeper pages then enter the
        LRU before their parents and are reclaimed first."""
        pages, _ = self._table.pop(task_id)
        for idx in reversed(pages):
            self._pool.free(idx)

    def task_cached(self, task_id: TaskId) -> int:
        """Tokens of the task's prompt that `task_alloc` found in the prefix cache."""
        return self._table.get_cached(task_id)

    def task_pages(self, task_id: TaskId) -> list[int]:
        return self._table.get_ref(task_id)

    def task_record_hashes(self, task_id: TaskId, token_ids: Sequence[int], n_computed: int) -> None:
        """Index the task's full pages among its first `n_computed` tokens (their K/V written)."""
        if not self.enable_prefix_cache:
            return
        ps, pages = self.page_size, self._table.get(task_id)
        done, full = self._table.get_recorded(task_id), n_computed // ps
        namespace = self._table.get_namespace(task_id)
        for i in range(done, full):
            parent = pages[i - 1] if i else NO_PARENT
            if not self._pool.prefix_cache.has_page(pages[i]):
                self._pool.record(pages[i], token_ids[i * ps : (i + 1) * ps], parent, namespace)
        self._table.set_recorded(task_id, max(done, full))

    def reset_prefix_cache(self) -> None:
        self._pool.reset_prefix_cache()
        for task_id in self._table.task_ids():
            self._table.set_recorded(task_id, 1 << 62)  # their pages hold stale prefixes

    # -- forward ----------------------------------------------------------------------------
    def make_table_tensor(self, task_ids: Sequence[TaskId], device: torch.device | str) -> torch.Tensor:
        """(B, longest page table) physical page ids of the tasks, padded with page 0."""
        return self._table.table_tensor(task_ids, device)

    def bind(self, task_ids: Sequence[TaskId], starts: Sequence[int], n_new: int) -> KvcacheView:
        """A view for one forward: row b holds `starts[b]` computed tokens plus `n_new` new ones."""
        ps = self.page_size
        width = -(-(max(starts) + n_new) // ps)
        table = self._table.table_tensor(task_ids, self._storage.device, width)
        return KvcacheView(self._storage, table, list(starts), n_new)

    def bind_packed(
        self,
        decode: Sequence[tuple[TaskId, int]],
        prefill: Sequence[tuple[TaskId, int, int]],
    ) -> PackedView:
        """A view for one packed step: (task, start) decode rows, longest first, then
        (task, start, n_new) prefill chunks."""
        pages = self._table.get
        return PackedView(self._storage, [Segment(pages(t), s, 1) for t, s in decode],
                          [Segment(pages(t), s, n) for t, s, n in prefill])

    # -- accounting -------------------------------------------------------------------------
    def audit(self) -> None:
        """Check every page is in exactly one consistent state; raises AssertionError if not."""
        alloc, prefix = self._pool.allocator, self._pool.prefix_cache
        holders = Counter(p for t in self._table.task_ids() for p in self._table.get(t))
        for idx in range(self.n_pages):
            refs = alloc.ref_count(idx)
            assert refs == holders[idx], f"page {idx}: {refs} refs but {holders[idx]} holders"
            states = [alloc.is_free(idx), alloc.is_cached_idle(idx), refs > 0]
            assert sum(states) == 1, f"page {idx}: free/cached/held = {states}"
            if alloc.is_cached_idle(idx) or alloc.is_free(idx):
                assert prefix.has_page(idx) == alloc.is_cached_idle(idx), f"page {idx}: cache index"
        children = Counter(e.parent for e in prefix._entries.values() if e.parent >= 0)
        assert children == Counter(prefix._children), "prefix cache child counts drifted"
        assert alloc.n_free + alloc.n_cached + alloc.n_used == self.n_pages
