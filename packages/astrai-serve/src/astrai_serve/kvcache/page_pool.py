"""`PagePool`: the allocator and the prefix cache behind one interface, kept consistent.

The allocator decides which page to reclaim; the prefix cache says which idle pages are worth
keeping and which of them are leaves (safe to evict). Freeing a page that the prefix cache
indexes parks it in the LRU instead of the free mask, so a later prompt can still hit it.
"""

from __future__ import annotations

from collections.abc import Sequence

from astrai_serve.kvcache.allocator import Allocator
from astrai_serve.kvcache.prefix_cache import NO_PARENT, PrefixCache


class PagePool:
    def __init__(self, n_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self._prefix = PrefixCache(page_size)
        self._alloc = Allocator(
            n_pages,
            can_evict=lambda idx: self._prefix.n_children(idx) == 0,
            on_evict=self._prefix.evict,
        )

    @property
    def n_pages(self) -> int:
        return self._alloc.n_pages

    @property
    def allocator(self) -> Allocator:
        return self._alloc

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._prefix

    def available(self) -> int:
        return self._alloc.available()

    def alloc(self) -> int:
        return self._alloc.alloc()

    def free(self, idx: int) -> None:
        self._alloc.free(idx, keep_cached=self._prefix.has_page(idx))

    def inc_ref(self, idx: int) -> None:
        self._alloc.inc_ref(idx)

    def lookup(self, token_ids: Sequence[int], namespace: int = 0) -> list[int]:
        return self._prefix.lookup(token_ids, namespace)

    def record(self, page_idx: int, token_ids: Sequence[int], parent: int = NO_PARENT,
               namespace: int = 0) -> bool:
        return self._prefix.record(page_idx, token_ids, parent, namespace)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the weights changed): idle cached pages become free, held
        ones return to the free mask when their tasks release them."""
        for idx in self._prefix.clear():
            self._alloc.uncache(idx)
