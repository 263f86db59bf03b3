"""Property test: any sequence of admissions, extensions, completions, aborts and prefix-cache
resets keeps the allocator's reference counts, free mask, LRU and prefix index consistent, and
leaks no page once every task is gone."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from astrai_core.model import KVSpec
from astrai_serve import KVCache

PAGE = 2
# Few distinct page contents, so prompts often share (or almost share) prefixes.
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=12)


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(n_pages=st.integers(3, 12))
    def setup(self, n_pages: int) -> None:
        self.cache = KVCache(KVSpec(1, 2, 1, 2), n_layers=1, page_size=PAGE, max_tokens=n_pages * PAGE)
        self.tasks: dict[int, tuple[list[int], int]] = {}  # id -> (tokens, computed)
        self.next_id = 0

    @rule(tokens=TOKENS)
    def admit(self, tokens: list[int]) -> None:
        task_id, self.next_id = self.next_id, self.next_id + 1
        cached = self.cache.task_alloc(task_id, tokens)
        assert cached % PAGE == 0 and cached < len(tokens)
        assert self.cache.task_pages(task_id) == self.cache.pool.lookup(tokens)[: cached // PAGE]
        self.tasks[task_id] = (tokens, cached)

    @precondition(lambda self: self.tasks)
    @rule(data=st.data(), n=st.integers(1, 5))
    def compute(self, data: st.DataObject, n: int) -> None:
        """Compute up to n more tokens (a prefill chunk or, past the prompt, decode steps)."""
        task_id = data.draw(st.sampled_from(sorted(self.tasks)))
        tokens, computed = self.tasks[task_id]
        tokens = tokens + data.draw(st.lists(st.integers(0, 2), max_size=n))  # sampled tokens
        target = min(len(tokens), computed + n)
        free_before = self.cache.page_counts()
        if not self.cache.task_extend(task_id, target):
            assert self.cache.page_counts() == free_before  # nothing allocated on failure
            return
        assert len(self.cache.task_pages(task_id)) * PAGE >= target
        self.cache.task_record_hashes(task_id, tokens, target)
        self.tasks[task_id] = (tokens, target)

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def finish_or_abort(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.tasks)))
        self.cache.task_free(task_id)
        del self.tasks[task_id]

    @rule()
    def reset_prefix_cache(self) -> None:
        self.cache.reset_prefix_cache()

    @invariant()
    def accounting_is_consistent(self) -> None:
        self.cache.audit()
        held = {p for t in self.tasks for p in self.cache.task_pages(t)}
        assert self.cache.page_counts()["used"] == len(held)

    def teardown(self) -> None:
        for task_id in list(self.tasks):
            self.cache.task_free(task_id)
        self.cache.audit()
        counts = self.cache.page_counts()
        assert counts["used"] == 0 and counts["free"] + counts["cached"] == counts["total"]


TestKVCacheProperties = KVCacheMachine.TestCase
TestKVCacheProperties.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
