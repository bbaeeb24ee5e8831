"""The `MetricSource` seam: how alert rules, health scores and reports read metrics.

A query names a metric, a statistic and optionally a label subset and a sliding window:

- `value`: a counter's total or a gauge's current value;
- `count`, `sum`, `mean`, `min`, `max`, `stddev`: over a histogram's (or timer's) observations;
- `rate`: increase per second (counters, and observation counts of histograms);
- `p50`, `p90`, `p95`, `p99` or any `pNN` / `pNN.N`: a quantile of the observations.

Series whose labels include every given label are aggregated: counts and sums add up, quantiles
come from the merged sketches, gauges add up. The answer is None when there is no data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

STATS = ("value", "count", "sum", "mean", "min", "max", "stddev", "rate")
QUANTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")


def quantile_of(stat: str) -> float | None:
    """0.99 for 'p99', 0.999 for 'p99.9'; None when `stat` is not a quantile."""
    match = QUANTILE.match(stat)
    return float(match.group(1)) / 100 if match else None


def is_stat(stat: str) -> bool:
    return stat in STATS or quantile_of(stat) is not None


@runtime_checkable
class MetricSource(Protocol):
    """Something that answers metric queries (the aggregator's registry, a stored snapshot)."""

    def query(self, name: str, stat: str, labels: Mapping[str, str] | None = None,
              window_s: float | None = None) -> float | None: ...
