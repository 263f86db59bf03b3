"""The paged KV cache: sizing, the allocator's states and eviction order, the prefix cache's
keys, and the paged view against a dense forward."""

from __future__ import annotations

import pytest
import torch

from astrai_core.model import KVSpec, Transformer, get_preset
from astrai_serve import Allocator, KVCache, PagePool, PrefixCache, Storage
from astrai_serve.kvcache import OutOfPagesError, bytes_per_page, pages_for_budget
from tolerances import forward_bound

SPEC = KVSpec(2, 8, 2, 8)
MLA_TINY = dict(attention_type="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12)


# -- Storage ----------------------------------------------------------------------------------
def test_storage_is_sized_by_tokens_or_memory():
    assert pages_for_budget(SPEC, 3, 16, torch.float32, max_tokens=100) == 7  # ceil(100 / 16)
    per_page = bytes_per_page(SPEC, 3, 16, torch.float32)
    assert per_page == 3 * 16 * (2 * 8 + 2 * 8) * 4
    assert pages_for_budget(SPEC, 3, 16, torch.float32, max_bytes=10 * per_page + 5) == 10
    cache = KVCache(SPEC, 3, page_size=16, max_bytes=10 * per_page)
    assert cache.n_pages == 10 and cache.storage.nbytes == 10 * per_page
    with pytest.raises(ValueError, match="exactly one"):
        pages_for_budget(SPEC, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="exactly one"):
        pages_for_budget(SPEC, 3, 16, torch.float32, max_tokens=8, max_bytes=8)
    with pytest.raises(ValueError, match="holds no page"):
        pages_for_budget(SPEC, 3, 16, torch.float32, max_bytes=per_page - 1)


def test_storage_write_then_gather_round_trips_tokens():
    storage = Storage(KVSpec(1, 3, 2, 2), n_layers=2, n_pages=4, page_size=2)
    k, v = torch.randn(3, 1, 3), torch.randn(3, 2, 2)
    storage.write(1, torch.tensor([5, 0, 4]), k, v)  # slot = page * 2 + offset
    gk, gv = storage.gather(1, torch.tensor([0, 3, 2]))  # pages 0, 3 and 2
    assert torch.equal(gk[0, 0], k[1]) and torch.equal(gk[2, 1], k[0]) and torch.equal(gk[2, 0], k[2])
    assert torch.equal(gv[0, 0], v[1]) and torch.equal(gv[2, 1], v[0])
    assert gk[1].abs().sum() == 0 and storage.k_cache[0].abs().sum() == 0  # untouched


# -- Allocator --------------------------------------------------------------------------------
def test_allocator_hands_out_lowest_free_page_and_counts_references():
    a = Allocator(4)
    assert [a.alloc(), a.alloc()] == [0, 1]
    a.inc_ref(1)
    a.free(1)
    assert a.ref_count(1) == 1 and not a.is_free(1)
    a.free(1)
    assert a.is_free(1) and a.alloc() == 1
    assert (a.n_used, a.n_free, a.n_cached) == (2, 2, 0)


def test_allocator_evicts_cached_pages_least_recently_used_first_and_only_when_needed():
    evicted: list[int] = []
    a = Allocator(3, on_evict=evicted.append)
    pages = [a.alloc() for _ in range(3)]
    for p in pages:
        a.free(p, keep_cached=True)
    assert (a.n_free, a.n_cached, a.available()) == (0, 3, 3)
    a.touch(0)  # page 0 is now the most recently used
    assert a.alloc() == 1 and a.alloc() == 2 and evicted == [1, 2]
    a.inc_ref(0)  # a prefix hit takes the cached page back without evicting it
    assert a.ref_count(0) == 1 and evicted == [1, 2]
    with pytest.raises(OutOfPagesError):
        a.alloc()


def test_allocator_never_evicts_a_page_whose_children_are_cached():
    pool = PagePool(3, page_size=2)
    parent, child, other = pool.alloc(), pool.alloc(), pool.alloc()
    assert pool.record(parent, [1, 2]) and pool.record(child, [3, 4], parent=parent)
    assert pool.record(other, [9, 9])
    for p in (parent, other, child):  # the parent is now the least recently used
        pool.free(p)
    assert pool.alloc() == other  # the parent is skipped while its child is cached
    assert pool.alloc() == child
    assert pool.alloc() == parent  # once the child is gone, the parent is a leaf
    assert len(pool.prefix_cache) == 0


# -- PrefixCache ------------------------------------------------------------------------------
def test_prefix_cache_hits_only_the_same_tokens_after_the_same_prefix():
    cache = PrefixCache(page_size=2)
    assert cache.record(10, [1, 2]) and cache.record(11, [3, 4], parent=10)
    assert cache.lookup([1, 2, 3, 4, 5]) == [10, 11]
    assert cache.lookup([1, 2, 3]) == [10]  # a partial page never hits
    assert cache.lookup([3, 4, 1, 2]) == []  # the same pages in another order
    assert cache.lookup([0, 0, 3, 4]) == []  # page [3, 4] after another prefix
    assert cache.lookup([2, 1, 3, 4]) == []
    assert not cache.record(12, [1, 2])  # already cached in page 10
    assert not cache.record(13, [5, 6], parent=99)  # its parent is not cached


def test_prefix_cache_treats_a_hash_collision_as_a_miss():
    cache = PrefixCache(page_size=2)
    cache.record(10, [1, 2])
    forged_key = hash((0x5EED, (7, 8)))  # what [7, 8] would hash to, pointing at page 10
    cache._by_key[forged_key] = 10
    assert cache.lookup([7, 8]) == []  # page 10 holds [1, 2]: compared, rejected


def test_task_alloc_always_leaves_a_token_to_compute():
    cache = KVCache(SPEC, 1, page_size=2, max_tokens=16)
    cache.task_alloc("a", [1, 2, 3, 4])
    assert cache.task_extend("a", 4)
    cache.task_record_hashes("a", [1, 2, 3, 4], 4)
    cache.task_free("a")
    assert cache.task_alloc("b", [1, 2, 3, 4]) == 2  # both pages cached; the last one recomputed
    assert cache.task_alloc("c", [1, 2, 3, 4, 5]) == 4
    cache.audit()


def test_task_cached_counts_the_prompt_tokens_found_in_the_prefix_cache():
    cache = KVCache(SPEC, 1, page_size=2, max_tokens=16)
    assert cache.task_alloc("a", [1, 2, 3, 4, 5]) == 0 and cache.task_cached("a") == 0
    assert cache.task_extend("a", 5)
    cache.task_record_hashes("a", [1, 2, 3, 4, 5], 5)  # pages [1, 2] and [3, 4] indexed
    cache.task_free("a")
    assert cache.task_alloc("b", [1, 2, 3, 4, 9]) == 4 and cache.task_cached("b") == 4
    assert cache.task_alloc("c", [1, 2, 7, 7]) == 2 and cache.task_cached("c") == 2
    cache.audit()


def test_make_table_tensor_pads_each_page_table_with_page_0():
    cache = KVCache(SPEC, 1, page_size=2, max_tokens=16)
    cache.task_alloc("a", [1] * 5)
    assert cache.task_extend("a", 5)  # 3 pages, the lowest free ones: 0, 1, 2
    cache.task_alloc("b", [2] * 2)
    assert cache.task_extend("b", 2)  # page 3
    table = cache.make_table_tensor(["b", "a"], "cpu")
    assert table.dtype == torch.long and table.tolist() == [[3, 0, 0], [0, 1, 2]]
    assert table.tolist()[1] == cache.task_pages("a")


def test_task_extend_allocates_nothing_when_pages_are_short():
    cache = KVCache(SPEC, 1, page_size=4, max_tokens=16)  # 4 pages
    cache.task_alloc("a", [0] * 12)
    assert cache.task_extend("a", 12)
    cache.task_alloc("b", [0] * 8)
    assert not cache.task_extend("b", 8)
    assert cache.task_pages("b") == [] and cache.page_counts()["free"] == 1
    cache.audit()


# -- KvcacheView ------------------------------------------------------------------------------
def _bound(model: Transformer, full: torch.Tensor) -> float:
    """Paged and dense forwards round differently (tests/tolerances.py)."""
    c = model.config
    return forward_bound(c.n_layers, max(c.dim, c.dim_ffn), scale=full.abs().max().item())

@pytest.mark.parametrize("overrides", [{}, MLA_TINY], ids=["gqa", "mla"])
@torch.inference_mode()
def test_ragged_paged_forward_equals_full_forward(overrides):
    """Rows with different cached lengths, several new tokens each, one forward: the mask path."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", **overrides)).eval().double()  # float64: tolerances.py bounds
    cache = KVCache(model.kv_spec(), model.config.n_layers, page_size=4, max_tokens=128,
                    dtype=torch.float64)
    seqs = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    starts, new = [5, 11, 0], 3
    for row, start in enumerate(starts):
        cache.task_alloc(row, seqs[row].tolist())
        assert cache.task_extend(row, start + new)
        if start:
            view = cache.bind([row], [0], start)  # prefill each row alone to its own length
            model(seqs[row : row + 1, :start], paged_cache=view, position_ids=view.position_ids)
    view = cache.bind([0, 1, 2], starts, new)
    ids = torch.stack([seqs[r, s : s + new] for r, s in enumerate(starts)])
    got = model(ids, paged_cache=view, position_ids=view.position_ids)
    assert view.attention_mask() is not None
    for row, start in enumerate(starts):
        full = model(seqs[row : row + 1, : start + new])[0, start:]
        assert (got[row] - full).abs().max().item() <= _bound(model, full)


@pytest.mark.parametrize("overrides", [{}, MLA_TINY], ids=["gqa", "mla"])
@torch.inference_mode()
def test_packed_step_equals_full_forward(overrides):
    """One packed row: decode rows of very different lengths (several length groups), a prefill
    chunk after a cached prefix and a fresh prompt; every token's logits match a dense forward."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", **overrides)).eval().double()  # float64: tolerances.py bounds
    cache = KVCache(model.kv_spec(), model.config.n_layers, page_size=4, max_tokens=512,
                    dtype=torch.float64)
    seqs = torch.randint(0, model.config.vocab_size, (5, 60), generator=torch.Generator().manual_seed(1))
    done = {0: 50, 1: 47, 2: 9, 3: 20, 4: 0}  # tokens already computed per sequence
    for row, n in done.items():
        cache.task_alloc(row, seqs[row].tolist())
        cache.task_extend(row, n + 7)
        if n:
            view = cache.bind([row], [0], n)
            model(seqs[row : row + 1, :n], paged_cache=view, position_ids=view.position_ids)
    decode, prefill = [(0, 50), (1, 47), (2, 9)], [(3, 20, 7), (4, 0, 5)]
    view = cache.bind_packed(decode, prefill)
    assert len(view._groups) == 2  # 13 pages vs 3 pages: not one padded group
    ids = [int(seqs[r, s]) for r, s in decode] + [int(t) for r, s, n in prefill for t in seqs[r, s : s + n]]
    logits = model(torch.tensor([ids]), paged_cache=view, position_ids=view.position_ids)[0]
    expected = [model(seqs[r : r + 1, : s + 1])[0, -1:] for r, s in decode]
    expected += [model(seqs[r : r + 1, : s + n])[0, s:] for r, s, n in prefill]
    expected = torch.cat(expected)
    assert (logits - expected).abs().max().item() <= _bound(model, expected)
