"""Reading global token ranges out of segmented streams.

A stream of billions of tokens is stored as many segments (HDF5 datasets or in-memory arrays).
A range [begin, end) may start in one segment and end several segments later; the fetcher
finds the first segment with a bisect over cumulative lengths and stitches the pieces.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import numpy as np


class BaseSegmentFetcher:
    """One stream split into segments. Segments are sliceable 1-D arrays (numpy or h5py)."""

    def __init__(self, segments: Sequence[Any]) -> None:
        self.segments = list(segments)
        lengths = [len(s) for s in self.segments]
        # cum_lengths[i] is the global index of segment i's first token; the last entry is the total.
        self.cum_lengths = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
        self.total_length: int = self.cum_lengths[-1]
        self.dtype = np.dtype(self.segments[0].dtype) if self.segments else np.dtype(np.uint32)

    def __len__(self) -> int:
        return self.total_length

    def fetch_data(self, begin: int, end: int) -> np.ndarray:
        """Tokens [begin, end) of the stream, across segment boundaries if need be."""
        if not 0 <= begin <= end <= self.total_length:
            raise IndexError(f"range [{begin}, {end}) is outside the stream [0, {self.total_length})")
        if begin == end:
            return np.empty(0, dtype=self.dtype)
        seg = bisect_right(self.cum_lengths, begin) - 1
        start = self.cum_lengths[seg]
        if end <= self.cum_lengths[seg + 1]:  # the common case: one segment, one read
            return np.asarray(self.segments[seg][begin - start:end - start])
        pieces = []
        while begin < end:
            seg_end = self.cum_lengths[seg + 1]
            stop = min(end, seg_end)
            pieces.append(np.asarray(self.segments[seg][begin - start:stop - start]))
            begin, start, seg = stop, seg_end, seg + 1
        return np.concatenate(pieces)


class MultiSegmentFetcher:
    """Several streams fetched by the same range, e.g. `sequence` and its `loss_mask`."""

    def __init__(self, segments: dict[str, Sequence[Any]]) -> None:
        self.multi_keys = list(segments)
        self.multi_fetchers = {key: BaseSegmentFetcher(segs) for key, segs in segments.items()}

    def key_fetch(self, begin: int, end: int, keys: str | Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(keys, str):
            keys = [keys]
        missing = [k for k in keys if k not in self.multi_fetchers]
        if missing:
            raise KeyError(f"no stream {missing}; available: {', '.join(self.multi_keys)}")
        return {key: self.multi_fetchers[key].fetch_data(begin, end) for key in keys}

    def fetch_data(self, begin: int, end: int) -> dict[str, np.ndarray]:
        return self.key_fetch(begin, end, self.multi_keys)
