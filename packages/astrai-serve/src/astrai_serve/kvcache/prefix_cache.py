"""`PrefixCache`: an index from full pages of tokens to the pages that hold their keys/values.

A page's key chains its parent's key with its own tokens, key = hash((parent_key, tokens)), so
a page only ever matches at the same position after the same prefix: the same tokens after
another prefix, or the same tokens in another order, hash differently. Since a 64-bit hash can
collide, a hit is accepted only if the stored tokens and the stored parent page both match;
a collision is therefore a miss, never a wrong answer.

A namespace keeps apart K/V that the same tokens produce under different weights (serving: each
LoRA adapter, since an adapter on k_proj/v_proj, or on any layer below, changes them): it seeds
the first page's key, and a hit must have been recorded under the caller's namespace. The base
model's namespace is 0, whose keys are those of a cache without namespaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ROOT_KEY = 0x5EED  # parent key of a sequence's first page (namespace 0)
NO_PARENT = -1


def root_key(namespace: int) -> int:
    return ROOT_KEY if namespace == 0 else hash((ROOT_KEY, namespace))


@dataclass(slots=True)
class _Entry:
    key: int
    tokens: tuple[int, ...]
    parent: int  # parent page index, NO_PARENT for a first page
    namespace: int = 0


class PrefixCache:
    def __init__(self, page_size: int) -> None:
        self._page_size = page_size
        self._by_key: dict[int, int] = {}  # key -> page
        self._entries: dict[int, _Entry] = {}  # page -> what it holds
        self._children: dict[int, int] = {}  # page -> number of cached pages that continue it

    def __len__(self) -> int:
        return len(self._entries)

    def has_page(self, idx: int) -> bool:
        return idx in self._entries

    def n_children(self, idx: int) -> int:
        return self._children.get(idx, 0)

    def lookup(self, token_ids: Sequence[int], namespace: int = 0) -> list[int]:
        """Pages holding the longest cached run of full pages that starts `token_ids`, among
        those recorded under `namespace`."""
        ps, pages = self._page_size, []
        key, parent = root_key(namespace), NO_PARENT
        for start in range(0, len(token_ids) - ps + 1, ps):
            tokens = tuple(token_ids[start : start + ps])
            key = hash((key, tokens))
            page = self._by_key.get(key)
            if page is None:
                break
            entry = self._entries[page]
            if entry.tokens != tokens or entry.parent != parent or entry.namespace != namespace:
                break  # a hash collision, not a hit
            pages.append(page)
            parent = page
        return pages

    def record(self, page_idx: int, token_ids: Sequence[int], parent: int = NO_PARENT,
               namespace: int = 0) -> bool:
        """Index full page `page_idx` holding `token_ids` after page `parent`, computed under
        `namespace`. Returns False (and records nothing) if the parent is not cached or these
        tokens are cached elsewhere."""
        assert len(token_ids) == self._page_size, "only full pages are cached"
        assert page_idx not in self._entries, f"page {page_idx} is already cached"
        if parent == NO_PARENT:
            parent_key = root_key(namespace)
        elif parent in self._entries:
            parent_key = self._entries[parent].key
        else:
            return False
        tokens = tuple(token_ids)
        key = hash((parent_key, tokens))
        if key in self._by_key:
            return False
        self._by_key[key] = page_idx
        self._entries[page_idx] = _Entry(key, tokens, parent, namespace)
        if parent != NO_PARENT:
            self._children[parent] = self._children.get(parent, 0) + 1
        return True

    def evict(self, page_idx: int) -> None:
        entry = self._entries.pop(page_idx)
        del self._by_key[entry.key]
        if entry.parent != NO_PARENT:
            left = self._children[entry.parent] - 1
            if left:
                self._children[entry.parent] = left
            else:
                del self._children[entry.parent]

    def clear(self) -> list[int]:
        """Forget everything; returns the pages that were cached."""
        pages = list(self._entries)
        self._by_key.clear()
        self._entries.clear()
        self._children.clear()
        return pages
