"""Trends of metrics over stored results, and a forecast of the next points.

Each result file is one point in time: its `meta.date` when every file has a distinct one (time
in days since the first), else its place in the given order (time = index). A metric's value at
a point is the center of its samples there (`regression.center`). For each metric with at least
MIN_POINTS points: the Mann-Kendall test and Sen's slope (`trend.mann_kendall`, alpha 0.05),
and a forecast of the next `horizon` points at the median spacing, from the ordinary
least-squares line with its prediction interval at `confidence` c:

    y(t) +- t_{n-2, (1+c)/2} * s * sqrt(1 + 1/n + (t - mean t)^2 / sum (t_i - mean t)^2)

with s the residual standard error: where a new observation falls with probability c when the
series is a line plus independent normal noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pyagent.bench.regression import Better, center, direction
from pyagent.bench.results import Metrics, metrics, result_time
from pyagent.observe.metrics.trend import Trend, mann_kendall

MIN_POINTS = 3  # a line's prediction interval needs n - 2 >= 1 degrees of freedom
TREND_ALPHA = 0.05
DAY_S = 86400.0
TrendVerdict = Literal["worsening", "improving", "rising", "falling", "no trend"]


@dataclass(frozen=True)
class Forecast:
    time: float
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class MetricTrend:
    """One metric over the results: its points, trend test and forecast."""

    metric: str
    better: Better
    times: list[float]
    values: list[float]
    trend: Trend
    verdict: TrendVerdict
    forecast: list[Forecast]


def points(paths: Sequence[str | Path]) -> tuple[list[tuple[float, Metrics]], str]:
    """Each result's time and metrics, in time order, and the unit of time ("day", "result")."""
    found = [metrics(path) for path in paths]
    dates = [result_time(path) for path in paths]
    if all(d is not None for d in dates) and len(set(dates)) == len(dates):
        first = min(dates)  # type: ignore[type-var]
        timed = sorted(zip([(d - first) / DAY_S for d in dates], found,  # type: ignore[operator]
                           strict=True), key=lambda p: p[0])
        return timed, "day"
    return [(float(i), m) for i, m in enumerate(found)], "result"


def linear_forecast(times: Sequence[float], values: Sequence[float], ahead: Sequence[float],
                    confidence: float = 0.95) -> list[Forecast]:
    """Least-squares line through the points and its prediction interval at `ahead` times."""
    from scipy import stats

    t, y = np.asarray(times, dtype=float), np.asarray(values, dtype=float)
    n = t.size
    slope, intercept = np.polyfit(t, y, 1)
    residual = y - (intercept + slope * t)
    s = math.sqrt(float(residual @ residual) / (n - 2))
    spread = float(np.sum((t - t.mean()) ** 2))
    q = float(stats.t.ppf((1 + confidence) / 2, n - 2))
    out = []
    for time in ahead:
        value = float(intercept + slope * time)
        half = q * s * math.sqrt(1 + 1 / n + (time - t.mean()) ** 2 / spread)
        out.append(Forecast(float(time), value, value - half, value + half))
    return out


def metric_trends(series: list[tuple[float, Metrics]], horizon: int = 3,
                  confidence: float = 0.95,
                  overrides: Mapping[str, Better] | None = None) -> list[MetricTrend]:
    """The trend and forecast of every metric present at MIN_POINTS points or more."""
    names = sorted({name for _, found in series for name in found})
    out = []
    for name in names:
        present = [(t, center(found[name])) for t, found in series if name in found]
        if len(present) < MIN_POINTS:
            continue
        times, values = [t for t, _ in present], [v for _, v in present]
        trend = mann_kendall(values, times, alpha=TREND_ALPHA)
        step = float(np.median(np.diff(times)))
        ahead = [times[-1] + step * (k + 1) for k in range(horizon)]
        better = direction(name, overrides)
        out.append(MetricTrend(name, better, times, values, trend, _verdict(trend, better),
                               linear_forecast(times, values, ahead, confidence)))
    return out


def _verdict(trend: Trend, better: Better) -> TrendVerdict:
    if trend.direction == "none":
        return "no trend"
    if better == "unknown":
        return "rising" if trend.direction == "increasing" else "falling"
    rising_is_worse = better == "lower"
    return "worsening" if (trend.direction == "increasing") == rising_is_worse else "improving"
