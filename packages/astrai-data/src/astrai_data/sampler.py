"""A distributed sampler whose position can be saved and restored exactly.

Epoch e's order is a permutation drawn from (seed, e). It is cut to a length every rank can
share evenly, and rank r takes every world_size-th index starting at r, so ranks see disjoint
shards. The trainer reports each consumed batch with `advance()`; the sampler never counts what
it yielded, because DataLoader workers prefetch batches that may never be trained on. A resumed
sampler therefore starts exactly after the last batch the trainer consumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

# Must match between the run that saved a state and the run that loads it.
_FIXED_FIELDS = {
    "dataset_len": "the dataset has a different number of samples",
    "batch_size": "the batch size changed, so batch boundaries moved",
    "world_size": "the number of processes changed, so every rank's shard moved",
    "seed": "the seed changed, so the sample order changed",
    "shuffle": "shuffling was switched",
    "drop_last": "drop_last changed, so the epoch length changed",
}


class ResumableDistributedSampler(Sampler[int]):
    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True) -> None:
        if dataset_len < 1 or batch_size < 1 or world_size < 1:
            raise ValueError(f"dataset_len ({dataset_len}), batch_size ({batch_size}) and "
                             f"world_size ({world_size}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if drop_last and dataset_len < batch_size * world_size:
            raise ValueError(f"{dataset_len} samples do not fill one batch of {batch_size} on each "
                             f"of {world_size} processes; lower the batch size or add data")
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.iter = 0

    @property
    def samples_per_rank(self) -> int:
        """Indices each rank gets per epoch."""
        if self.drop_last:
            return self.batches_per_epoch * self.batch_size
        return math.ceil(self.dataset_len / self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.dataset_len // (self.batch_size * self.world_size)
        return math.ceil(self.samples_per_rank / self.batch_size)

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's whole index list for an epoch (default: the current one)."""
        return self._rank_order(self.epoch if epoch is None else epoch).tolist()

    def _rank_order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        total = self.samples_per_rank * self.world_size
        if total > order.numel():  # without drop_last, wrap around so every rank gets as many
            order = order.repeat(math.ceil(total / order.numel()))
        return order[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        # Only the part still to come is turned into Python ints.
        return iter(self._rank_order(self.epoch)[self.iter * self.batch_size:].tolist())

    def __len__(self) -> int:
        """Indices the next `__iter__` yields: the rest of the current epoch."""
        return max(self.samples_per_rank - self.iter * self.batch_size, 0)

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` and reset the batch counter. Setting the epoch the sampler is already
        in keeps the counter, so a restored sampler resumes mid-epoch under the usual
        `for epoch in range(start, n): sampler.set_epoch(epoch)` loop."""
        if epoch != self.epoch:
            self.epoch, self.iter = epoch, 0

    def advance(self, n: int = 1) -> None:
        """Record that the trainer consumed `n` more batches of this epoch."""
        if n < 0 or self.iter + n > self.batches_per_epoch:
            raise ValueError(f"cannot advance by {n}: {self.iter} of {self.batches_per_epoch} "
                             f"batches of epoch {self.epoch} are already consumed")
        self.iter += n

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "iter": self.iter,
                **{name: getattr(self, name) for name in _FIXED_FIELDS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, why in _FIXED_FIELDS.items():
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume the sampler: the checkpoint has {name}={state[name]}, this run "
                    f"has {name}={getattr(self, name)}; {why}, so the resumed run would repeat or "
                    f"skip samples. Resume with {name}={state[name]}, or start a new run.")
        if not 0 <= state["iter"] <= self.batches_per_epoch:
            raise ValueError(f"sampler state iter={state['iter']} is outside the epoch's "
                             f"{self.batches_per_epoch} batches")
        self.epoch, self.iter = int(state["epoch"]), int(state["iter"])
