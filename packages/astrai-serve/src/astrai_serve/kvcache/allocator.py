"""`Allocator`: which pages are free, who holds them, and which idle pages still hold a cached
prefix worth keeping.

A page is in exactly one of three states:
- free: its bit is set in `_free_mask`, reference count 0;
- held: reference count > 0 (one per task whose page table lists it);
- cached: reference count 0 but its contents are indexed by the prefix cache; it sits in the
  LRU and is reclaimed only when no free page is left, least recently used first, and never
  while a page that continues its prefix is still cached (that child would become unreachable).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class OutOfPagesError(RuntimeError):
    """No free or reclaimable page is left; callers check `available()` first."""


class Allocator:
    def __init__(
        self,
        n_pages: int,
        can_evict: Callable[[int], bool] = lambda idx: True,
        on_evict: Callable[[int], None] = lambda idx: None,
    ) -> None:
        if n_pages < 1:
            raise ValueError(f"an Allocator needs at least one page, got {n_pages}")
        self.n_pages = n_pages
        self._free_mask = (1 << n_pages) - 1  # bit i set <=> page i is free
        self._n_free = n_pages
        self.refs_count = [0] * n_pages
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached idle pages, oldest first
        self._can_evict = can_evict
        self._on_evict = on_evict

    # -- counts ---------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        return self._n_free

    @property
    def n_cached(self) -> int:
        return len(self._lru)

    @property
    def n_used(self) -> int:
        return self.n_pages - self._n_free - len(self._lru)

    def available(self) -> int:
        """Pages `alloc` can still hand out: free ones plus every cached idle one (a cached page's
        children are idle too, so all of them can be reclaimed, leaves first)."""
        return self._n_free + len(self._lru)

    def ref_count(self, idx: int) -> int:
        return self.refs_count[idx]

    def is_free(self, idx: int) -> bool:
        return bool(self._free_mask >> idx & 1)

    def is_cached_idle(self, idx: int) -> bool:
        return idx in self._lru

    # -- transitions ----------------------------------------------------------------------
    def alloc(self) -> int:
        """A page with reference count 1: the lowest free page, else the oldest evictable one."""
        if self._free_mask:
            low = self._free_mask & -self._free_mask  # lowest set bit, in C-speed integer ops
            self._free_mask ^= low
            self._n_free -= 1
            idx = low.bit_length() - 1
        else:
            idx = self._evict_oldest()
        self.refs_count[idx] = 1
        return idx

    def free(self, idx: int, keep_cached: bool = False) -> None:
        """Drop one reference; at zero the page becomes free, or cached idle if `keep_cached`."""
        refs = self.refs_count[idx]
        assert refs > 0, f"page {idx} freed with no reference held"
        self.refs_count[idx] = refs - 1
        if refs > 1:
            return
        if keep_cached:
            self._lru[idx] = None
        else:
            self._release(idx)

    def inc_ref(self, idx: int) -> None:
        """Add a holder; a cached idle page (a prefix hit) leaves the LRU and is held again."""
        if self.refs_count[idx] == 0:
            assert idx in self._lru, f"inc_ref on page {idx}, which is neither held nor cached"
            del self._lru[idx]
        self.refs_count[idx] += 1

    def touch(self, idx: int) -> None:
        """Mark a cached idle page as just used."""
        if idx in self._lru:
            self._lru.move_to_end(idx)

    def uncache(self, idx: int) -> None:
        """The page's cached contents became invalid: free it now if it is idle."""
        if idx in self._lru:
            del self._lru[idx]
            self._release(idx)

    def _release(self, idx: int) -> None:
        self._free_mask |= 1 << idx
        self._n_free += 1

    def _evict_oldest(self) -> int:
        for idx in self._lru:
            if self._can_evict(idx):
                del self._lru[idx]
                self._on_evict(idx)
                return idx
        raise OutOfPagesError("no free page and no evictable cached page is left")
