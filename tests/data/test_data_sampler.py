"""ResumableDistributedSampler: disjoint shards, determinism and exact resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from astrai_data import ResumableDistributedSampler as Sampler


def _batches(sampler: Sampler, n: int | None = None) -> list[list[int]]:
    """Consume up to n batches of the current epoch the way a trainer does."""
    out, indices = [], list(sampler)
    for start in range(0, len(indices), sampler.batch_size):
        if n is not None and len(out) == n:
            break
        out.append(indices[start:start + sampler.batch_size])
        sampler.advance()
    return out


def _run(dataset_len, bs, ws, epochs, stop=None, **kw):
    """Every rank's batches over `epochs`; with stop=(epoch, k) the run is killed after batch k of
    that epoch and resumed from the saved states in fresh samplers."""
    samplers = [Sampler(dataset_len, bs, rank=r, world_size=ws, **kw) for r in range(ws)]
    seen = [[] for _ in range(ws)]
    for epoch in range(epochs):
        for rank, sampler in enumerate(samplers):
            sampler.set_epoch(epoch)
            if stop is not None and stop[0] == epoch:
                seen[rank] += _batches(sampler, stop[1])
                state = sampler.state_dict()
                sampler = samplers[rank] = Sampler(dataset_len, bs, rank=rank, world_size=ws, **kw)
                sampler.load_state_dict(state)
                sampler.set_epoch(epoch)  # the usual loop calls this again: it must not rewind
            seen[rank] += _batches(sampler)
    return seen


@pytest.mark.parametrize(("ws", "bs", "drop_last"), [(1, 4, True), (2, 3, True), (3, 2, False)])
@pytest.mark.parametrize("stop", [(0, 0), (0, 2), (1, 3), (2, 1)])
def test_resume_sees_exactly_the_uninterrupted_samples(ws, bs, drop_last, stop):
    straight = _run(50, bs, ws, epochs=3, seed=7, drop_last=drop_last)
    resumed = _run(50, bs, ws, epochs=3, stop=stop, seed=7, drop_last=drop_last)
    assert resumed == straight


def test_resume_at_the_end_of_an_epoch_moves_on_to_the_next():
    sampler = Sampler(20, 4, seed=1)
    first = _batches(sampler)
    restored = Sampler(20, 4, seed=1)
    restored.load_state_dict(sampler.state_dict())
    assert list(restored) == [] and len(restored) == 0
    restored.set_epoch(1)
    assert _batches(restored) != first and len(_batches(Sampler(20, 4, seed=1))) == 5


def test_ranks_see_disjoint_shards_covering_the_epoch():
    shards = [set(Sampler(103, 5, rank=r, world_size=4, seed=3)) for r in range(4)]
    assert all(len(s) == 25 for s in shards)  # 103 // (5 * 4) = 5 batches of 5 per rank
    assert len(set.union(*shards)) == 100
    full = [list(Sampler(10, 2, rank=r, world_size=3, drop_last=False)) for r in range(3)]
    assert {i for shard in full for i in shard} == set(range(10))
    assert [len(s) for s in full] == [4, 4, 4]  # padded by wrapping around


def test_order_is_deterministic_per_seed_and_epoch():
    a, b, c = Sampler(64, 4, seed=5), Sampler(64, 4, seed=5), Sampler(64, 4, seed=6)
    assert list(a) == list(b) != list(c)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert sorted(a) == list(range(64))
    assert list(Sampler(8, 2, shuffle=False)) == list(range(8))


def test_iteration_alone_is_not_consumption():
    sampler = Sampler(40, 4, seed=2)

    class Identity(Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return i

    loader = DataLoader(Identity(), batch_size=4, sampler=sampler, num_workers=2, prefetch_factor=4)
    it = iter(loader)
    consumed = [next(it).tolist() for _ in range(3)]  # workers have prefetched far more
    for _ in consumed:
        sampler.advance()
    del it
    restored = Sampler(40, 4, seed=2)
    restored.load_state_dict(sampler.state_dict())
    rest = [b.tolist() for b in DataLoader(Identity(), batch_size=4, sampler=restored)]
    assert consumed + rest == [b.tolist() for b in DataLoader(Identity(), batch_size=4,
                                                               sampler=Sampler(40, 4, seed=2))]
    assert len(restored) == 28 and len(rest) == 7


@pytest.mark.parametrize(("field", "value", "why"), [
    ("world_size", 2, "number of processes changed"),
    ("batch_size", 8, "batch size changed"),
    ("dataset_len", 99, "different number of samples"),
    ("seed", 1, "seed changed"),
])
def test_resume_with_a_different_setup_is_refused(field, value, why):
    saved = Sampler(64, 4).state_dict()
    args = {"dataset_len": 64, "batch_size": 4, "world_size": 1, "seed": 0, field: value}
    with pytest.raises(ValueError, match=f"checkpoint has {field}=.*{why}.*Resume with {field}="):
        Sampler(**args).load_state_dict(saved)


def test_state_round_trips_and_counts_consumed_batches():
    sampler = Sampler(64, 4, rank=1, world_size=2, seed=9)
    sampler.set_epoch(2)
    sampler.advance(3)
    state = sampler.state_dict()
    assert (state["epoch"], state["iter"]) == (2, 3)
    assert len(sampler) == 32 - 12 and list(sampler) == sampler.epoch_indices()[12:]
    sampler.set_epoch(2)
    assert sampler.iter == 3
    sampler.set_epoch(3)
    assert sampler.iter == 0


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        Sampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="do not fill one batch"):
        Sampler(5, 4, world_size=2)
    sampler = Sampler(8, 4)
    sampler.advance(2)
    with pytest.raises(ValueError, match="cannot advance by 1: 2 of 2 batches"):
        sampler.advance()
    assert torch.tensor(list(Sampler(8, 4, drop_last=False))).numel() == 8
