"""The paged KV cache: `Storage` (the tensors), `Allocator` + `PrefixCache` behind `PagePool`
(which pages), `TaskTable` (whose pages), composed by `KVCache`; `KvcacheView` (a rectangular
batch) and `PackedView` (one packed engine step) are the model's per-forward `PagedCache`."""

from astrai_serve.kvcache.allocator import Allocator, OutOfPagesError
from astrai_serve.kvcache.kvcache import KVCache
from astrai_serve.kvcache.packed_view import PackedView
from astrai_serve.kvcache.page_pool import PagePool
from astrai_serve.kvcache.prefix_cache import PrefixCache
from astrai_serve.kvcache.storage import Storage, bytes_per_page, pages_for_budget
from astrai_serve.kvcache.task_table import TaskTable
from astrai_serve.kvcache.view import KvcacheView

__all__ = [
    "Allocator", "KVCache", "KvcacheView", "OutOfPagesError", "PackedView", "PagePool",
    "PrefixCache", "Storage", "TaskTable", "bytes_per_page", "pages_for_budget",
]
