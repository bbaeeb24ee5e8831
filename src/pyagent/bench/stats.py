"""Statistics for paired benchmark samples: bootstrap confidence intervals of a mean."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean of `values`.

    For paired comparisons pass the per-sample differences (method minus reference)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(data.mean())
    if data.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, (resamples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return mean, float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
