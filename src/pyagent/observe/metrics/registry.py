"""`MetricsRegistry`: declares metric families by name and answers `MetricSource` queries.

There is no global registry: the runtime creates one and hands it to whatever records or reads.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pyagent.observe.metrics.source import STATS, is_stat
from pyagent.observe.metrics.types import (
    OVERFLOW,
    Counter,
    Family,
    Gauge,
    Histogram,
    MetricError,
    Settings,
    Timer,
)

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

FamilyT = TypeVar("FamilyT", bound=Family[Any])


class MetricsRegistry:
    """Metric families by name, with their shared clock, history and accuracy settings.

    Quantiles are within `relative_accuracy` (alpha, default 0.01: the answer for a true quantile x
    lies in [x(1 - alpha), x(1 + alpha)]). Counters and histograms keep `bucket_s` buckets over
    `max_window_s`, the longest window a query may ask for. A family takes at most
    `max_label_sets` label sets; `batch` observations are buffered per histogram series before
    they are folded into its sketch. `clock` (seconds, monotonic) drives every window.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 relative_accuracy: float = 0.01, bucket_s: float = 10.0,
                 max_window_s: float = 600.0, max_label_sets: int = 1000, batch: int = 1024):
        self.settings = Settings(clock=clock, relative_accuracy=relative_accuracy,
                                 bucket_s=bucket_s, max_window_s=max_window_s, batch=batch,
                                 max_label_sets=max_label_sets)
        self._lock = threading.Lock()
        self._families: dict[str, Family[Any]] = {}

    def counter(self, name: str, description: str = "",
                labelnames: tuple[str, ...] = ()) -> Counter:
        """The counter `name`, declared on first use."""
        return self._declare(Counter, name, description, labelnames)

    def gauge(self, name: str, description: str = "", labelnames: tuple[str, ...] = ()) -> Gauge:
        """The gauge `name`, declared on first use."""
        return self._declare(Gauge, name, description, labelnames)

    def histogram(self, name: str, description: str = "",
                  labelnames: tuple[str, ...] = ()) -> Histogram:
        """The histogram `name`, declared on first use."""
        return self._declare(Histogram, name, description, labelnames)

    def timer(self, name: str, description: str = "", labelnames: tuple[str, ...] = ()) -> Timer:
        """The timer `name` (a histogram of seconds), declared on first use."""
        return self._declare(Timer, name, description, labelnames)

    def _declare(self, family_type: type[FamilyT], name: str, description: str,
                 labelnames: tuple[str, ...]) -> FamilyT:
        labelnames = tuple(labelnames)
        with self._lock:
            family = self._families.get(name)
            if family is None:
                _check_declaration(family_type, name, labelnames)
                family = self._families[name] = family_type(name, description, labelnames,
                                                            self.settings)
        if type(family) is not family_type or family.labelnames != labelnames:
            raise MetricError(f"metric {name!r} is already declared as a {family.kind} with "
                              f"labels ({', '.join(family.labelnames)}); it cannot also be a "
                              f"{family_type.kind} with labels ({', '.join(labelnames)})")
        return family

    def get(self, name: str) -> Family[Any] | None:
        """The family declared as `name`, if any."""
        return self._families.get(name)

    def families(self) -> list[Family[Any]]:
        """Every declared family, in declaration order."""
        with self._lock:
            return list(self._families.values())

    def query(self, name: str, stat: str, labels: Mapping[str, str] | None = None,
              window_s: float | None = None) -> float | None:
        """`stat` of the series of `name` whose labels include `labels`, over the last `window_s`
        seconds (all time when None); None when there is no such series or no data.

        See `MetricSource` for the statistics. A window covers the `bucket_s` buckets overlapping
        [now - window_s, now]; `rate` divides by the time those buckets span, counted from the
        family's declaration at the earliest. A counter's `value` over a window is its increase;
        a gauge keeps no history, so its `value` ignores the window.
        """
        if not is_stat(stat):
            raise MetricError(f"unknown statistic {stat!r} for metric {name!r}; use one of "
                              f"{', '.join(STATS)} or a quantile such as p99")
        self.settings.check_window(window_s)
        family = self._families.get(name)
        if family is None:
            return None
        children = family.matching(labels or {})
        if not children:
            return None
        return family.aggregate(stat, children, self.settings.clock(), window_s)

    def snapshot(self) -> dict[str, Any]:
        """Every series' all-time statistics as plain JSON-able data."""
        now = self.settings.clock()
        return {"unix_time": time.time(), "relative_accuracy": self.settings.relative_accuracy,
                "metrics": {family.name: {
                    "type": family.kind, "description": family.description,
                    "labelnames": list(family.labelnames),
                    "series": [{"labels": labels, **family.describe(child, now)}
                               for labels, child in family.series()]}
                    for family in self.families()}}


def _check_declaration(family_type: type[Family[Any]], name: str,
                       labelnames: tuple[str, ...]) -> None:
    if not METRIC_NAME.match(name):
        raise MetricError(f"metric name {name!r} is not a valid Prometheus name")
    reserved = (OVERFLOW, "quantile") if family_type in (Histogram, Timer) else (OVERFLOW,)
    for label in labelnames:
        if not LABEL_NAME.match(label) or label.startswith("__") or label in reserved:
            raise MetricError(f"metric {name!r}: label name {label!r} is invalid or reserved")
    if len(set(labelnames)) != len(labelnames):
        raise MetricError(f"metric {name!r} declares a label twice: {', '.join(labelnames)}")
