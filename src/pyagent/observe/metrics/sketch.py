"""A mergeable quantile sketch that takes observations in numpy batches.

`Sketch` is a DDSketch (logarithmic mapping, bins collapsing from the lowest end past 2048) whose
quantiles are within `relative_accuracy` (alpha, default 0.01) of the true value: for a true
quantile x the answer lies in [x(1 - alpha), x(1 + alpha)]. Count, sum, min and max are exact; a sum
of squares gives the standard deviation. A batch is folded in by computing every value's bin key at
once with the sketch's own mapping, counting keys with `np.bincount`, and adding one count per
distinct key through the store.
"""

from __future__ import annotations

import math

import numpy as np
from ddsketch.ddsketch import DEFAULT_BIN_LIMIT, DEFAULT_REL_ACC, BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import CollapsingLowestDenseStore, Store


class BatchMapping(LogarithmicMapping):
    """DDSketch's logarithmic mapping, with keys computed for a whole array at once."""

    def keys(self, values: np.ndarray) -> np.ndarray:
        """`key(v)` for each of `values` (all above `min_possible`)."""
        logs = np.log(values) / math.log(2) * self._multiplier
        return (np.ceil(logs) + self._offset).astype(np.int64)


class Sketch(BaseDDSketch):
    """A DDSketch with batch insertion, exact min/max and a sum of squares; merges with `merge`."""

    def __init__(self, relative_accuracy: float = DEFAULT_REL_ACC,
                 bin_limit: int = DEFAULT_BIN_LIMIT):
        super().__init__(BatchMapping(relative_accuracy), CollapsingLowestDenseStore(bin_limit),
                         CollapsingLowestDenseStore(bin_limit), 0.0)
        self.sum_squares = 0.0

    def add_batch(self, values: np.ndarray) -> None:
        """Add every value of a 1-d float array (finite values only)."""
        if not values.size:
            return
        smallest = self._mapping.min_possible
        positive = values[values > smallest]
        negative = -values[values < -smallest]
        self._add_keys(self._store, positive)
        self._add_keys(self._negative_store, negative)
        self._zero_count += float(values.size - positive.size - negative.size)
        self._count += float(values.size)
        self._sum += float(values.sum())
        self.sum_squares += float(values @ values)
        self._min = min(self._min, float(values.min()))
        self._max = max(self._max, float(values.max()))

    def _add_keys(self, store: Store, values: np.ndarray) -> None:
        if not values.size:
            return
        keys = self._mapping.keys(values)
        low = int(keys.min())
        counts = np.bincount(keys - low)
        present = np.flatnonzero(counts)
        for key, count in zip((present + low).tolist(), counts[present].tolist(), strict=True):
            store.add(key, float(count))

    def merge(self, sketch: Sketch) -> None:  # type: ignore[override]
        """Add everything `sketch` holds to this one."""
        super().merge(sketch)
        self.sum_squares += sketch.sum_squares

    def quantile(self, q: float) -> float | None:
        """The value at quantile `q` (0..1), within the relative accuracy; None when empty."""
        return self.get_quantile_value(q)

    @property
    def minimum(self) -> float | None:
        return self._min if self._count else None

    @property
    def maximum(self) -> float | None:
        return self._max if self._count else None

    @property
    def mean(self) -> float | None:
        return self._sum / self._count if self._count else None

    @property
    def stddev(self) -> float | None:
        """Population standard deviation; None when empty."""
        if not self._count:
            return None
        mean = self._sum / self._count
        return math.sqrt(max(self.sum_squares / self._count - mean * mean, 0.0))
