"""Metric types: Counter, Gauge, Histogram and Timer families of labelled children, and Rate.

A family is declared with label names; `family.labels(agent="coder")` returns a cached child, and
a family without labels is used directly (`family.inc()`). Each child has its own small lock, so
recording is thread-safe and never blocks on I/O (usable from asyncio code).

History: counters and histograms keep a ring of per-interval buckets (`Settings.bucket_s`, default
10 s) reaching back over the longest window (`Settings.max_window_s`, default 10 min), plus an
all-time total. A windowed read covers every bucket overlapping [now - window_s, now], so it may
include up to one bucket more than asked for.

Histograms record into a small per-child buffer; the buffer is folded into the current bucket's
`Sketch` in one numpy batch when it fills, when the bucket closes, and before every read, so reads
always see every observation recorded before them. A closed bucket is merged into the all-time
sketch once, when it closes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import threading
from array import array
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from pyagent.errors import PyAgentError
from pyagent.observe.metrics.sketch import Sketch
from pyagent.observe.metrics.source import quantile_of

# The label of the one series that takes label sets past the limit. Not `__overflow__`: names
# starting with `__` are reserved in Prometheus, whose parser rejects them and whose server drops
# them on ingestion.
OVERFLOW = "overflow"
SNAPSHOT_QUANTILES = ("p50", "p90", "p95", "p99", "p99.9")

log = logging.getLogger(__name__)


class MetricError(PyAgentError):
    """A metric was declared, recorded or queried wrongly; the message names the metric."""


@dataclass(frozen=True)
class Settings:
    """How a registry's metrics measure time, keep history and bound their size."""

    clock: Callable[[], float]
    relative_accuracy: float = 0.01
    bucket_s: float = 10.0
    max_window_s: float = 600.0
    batch: int = 1024
    max_label_sets: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.relative_accuracy < 1:
            raise MetricError(f"relative_accuracy must lie in (0, 1), got {self.relative_accuracy}")
        if not 0 < self.bucket_s <= self.max_window_s:
            raise MetricError(f"need 0 < bucket_s <= max_window_s, got bucket_s={self.bucket_s} "
                              f"and max_window_s={self.max_window_s}")
        if self.batch < 1 or self.max_label_sets < 1:
            raise MetricError(f"batch and max_label_sets must be at least 1, got {self.batch} "
                              f"and {self.max_label_sets}")

    def bucket(self, t: float) -> int:
        """The index of the bucket holding time `t`."""
        return math.floor(t / self.bucket_s)

    def check_window(self, window_s: float | None) -> None:
        """Reject a window that is not positive or longer than the history kept."""
        if window_s is not None and not 0 < window_s <= self.max_window_s:
            raise MetricError(f"window_s must lie in (0, {self.max_window_s:g}] (the longest "
                              f"window kept), got {window_s}")

    def first_bucket(self, now: float, window_s: float | None) -> int | None:
        """The oldest bucket a window reaches at `now`; None for all time."""
        self.check_window(window_s)
        return None if window_s is None else self.bucket(now - window_s)

    def rate(self, events: float, now: float, window_s: float | None,
             since: float) -> float | None:
        """`events` per second over the time a window covers (never before `since`)."""
        start = since if window_s is None else max(since,
                                                   self.bucket(now - window_s) * self.bucket_s)
        return events / (now - start) if now > start else None


def _finite(metric: str, value: object) -> float:
    """`value` as a finite float, or a MetricError naming the metric and the value."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise MetricError(f"metric {metric!r} takes finite numbers, got {value!r}")


def _increment(metric: str, value: object) -> float:
    number = _finite(metric, value)
    if number < 0:
        raise MetricError(f"counter {metric!r} cannot decrease, got an increment of {value!r}")
    return number


class _Windowed:
    """A child that keeps per-bucket history: closed buckets in a ring, the current one apart."""

    __slots__ = ("_bucket", "_bucket_end", "_clock", "_lock", "_name", "_ring", "created",
                 "settings")

    def __init__(self, name: str, settings: Settings, created: float):
        self._name = name
        self.settings = settings
        self._clock = settings.clock
        self._lock = threading.Lock()
        self._ring: deque[tuple[int, Any]] = deque()
        self.created = created
        self._open(settings.clock())

    def _open(self, now: float) -> None:
        """Make the bucket holding `now` current and drop buckets older than the longest window."""
        settings = self.settings
        self._bucket = settings.bucket(now)
        self._bucket_end = (self._bucket + 1) * settings.bucket_s
        oldest = settings.bucket(now - settings.max_window_s)
        while self._ring and self._ring[0][0] < oldest:
            self._ring.popleft()

    def _advance(self, now: float) -> None:
        """Close the current bucket if `now` lies past it (lock held)."""
        if now >= self._bucket_end:
            self._close()
            self._open(now)

    def _close(self) -> None:
        raise NotImplementedError

    def events(self, now: float, first: int | None) -> float:
        """Counted events since bucket `first` (all time when None)."""
        raise NotImplementedError


class CounterChild(_Windowed):
    """A total that only goes up."""

    __slots__ = ("_current", "_total")

    def __init__(self, name: str, settings: Settings, created: float):
        self._total = 0.0
        self._current = 0.0
        super().__init__(name, settings, created)

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (>= 0)."""
        if amount.__class__ is not float or amount - amount != 0.0 or amount < 0.0:
            amount = _increment(self._name, amount)
        now = self._clock()
        with self._lock:
            if now >= self._bucket_end:
                self._advance(now)
            self._total += amount
            self._current += amount

    def value(self) -> float:
        """The all-time total."""
        return self._total

    def _close(self) -> None:
        if self._current:
            self._ring.append((self._bucket, self._current))
            self._current = 0.0

    def events(self, now: float, first: int | None) -> float:
        with self._lock:
            self._advance(now)
            if first is None:
                return self._total
            return self._current + sum(amount for index, amount in self._ring if index >= first)


class HistogramChild(_Windowed):
    """A distribution of observations, summarized by DDSketches per bucket and for all time."""

    __slots__ = ("_batch", "_buffer", "_current", "_total")

    def __init__(self, name: str, settings: Settings, created: float):
        self._buffer = array("d")
        self._batch = settings.batch
        self._current: Sketch | None = None
        self._total = Sketch(settings.relative_accuracy)
        super().__init__(name, settings, created)

    def observe(self, value: float) -> None:
        """Record one finite observation."""
        # `value - value` is 0.0 for every finite float and NaN for NaN and +-inf.
        if value.__class__ is not float or value - value != 0.0:
            value = _finite(self._name, value)
        now = self._clock()
        with self._lock:
            if now >= self._bucket_end:
                self._advance(now)
            buffer = self._buffer
            buffer.append(value)
            if len(buffer) >= self._batch:
                self._fold()

    def _fold(self) -> None:
        """Add the buffered observations to the current bucket's sketch (lock held)."""
        if not self._buffer:
            return
        if self._current is None:
            self._current = Sketch(self.settings.relative_accuracy)
        self._current.add_batch(np.array(self._buffer))
        del self._buffer[:]

    def _close(self) -> None:
        self._fold()
        if self._current is not None:
            self._ring.append((self._bucket, self._current))
            self._total.merge(self._current)
            self._current = None

    def events(self, now: float, first: int | None) -> float:
        with self._lock:
            self._advance(now)
            count = len(self._buffer) + (self._current.count if self._current else 0.0)
            if first is None:
                return count + self._total.count
            return count + sum(part.count for index, part in self._ring if index >= first)

    def merge_into(self, sketch: Sketch, now: float, first: int | None) -> None:
        """Add the observations since bucket `first` (all time when None) to `sketch`."""
        with self._lock:
            self._advance(now)
            self._fold()
            if first is None:
                sketch.merge(self._total)
            else:
                for index, part in self._ring:
                    if index >= first:
                        sketch.merge(part)
            if self._current is not None:
                sketch.merge(self._current)


class TimerChild(HistogramChild):
    """A histogram of durations in seconds, measured with `time()`."""

    __slots__ = ()

    def time(self) -> Timing:
        """A context manager and decorator (sync or async) that observes the seconds it spans."""
        return Timing(self)


F = TypeVar("F", bound=Callable[..., Any])


class Timing:
    """Observes the seconds between entering and leaving into a timer, failures included."""

    __slots__ = ("_start", "_timer")

    def __init__(self, timer: TimerChild):
        self._timer = timer
        self._start = 0.0

    def __enter__(self) -> Timing:
        self._start = self._timer.settings.clock()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._timer.observe(self._timer.settings.clock() - self._start)

    def __call__(self, func: F) -> F:
        timer = self._timer
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                with Timing(timer):
                    return await func(*args, **kwargs)
            return timed_async  # type: ignore[return-value]

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with Timing(timer):
                return func(*args, **kwargs)
        return timed  # type: ignore[return-value]


class GaugeChild:
    """A value that goes up and down."""

    __slots__ = ("_lock", "_name", "_value")

    def __init__(self, name: str, settings: Settings, created: float):
        self._name = name
        self._lock = threading.Lock()
        self._value = 0.0

    def set(self, value: float) -> None:
        if value.__class__ is not float or value - value != 0.0:
            value = _finite(self._name, value)
        with self._lock:
            self._value = value

    def inc(self, amount: float = 1.0) -> None:
        if amount.__class__ is not float or amount - amount != 0.0:
            amount = _finite(self._name, amount)
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-_finite(self._name, amount))

    def value(self) -> float:
        return self._value


class Rate:
    """Events per second over a sliding window: a view of a counter child (its increase) or a
    histogram child (its observations); over all time since the family was declared when
    `window_s` is None."""

    def __init__(self, source: CounterChild | HistogramChild, window_s: float | None = None):
        source.settings.check_window(window_s)
        self.source = source
        self.window_s = window_s

    def per_second(self) -> float | None:
        """The current rate; None before any time has passed."""
        settings = self.source.settings
        now = settings.clock()
        events = self.source.events(now, settings.first_bucket(now, self.window_s))
        return settings.rate(events, now, self.window_s, self.source.created)


C = TypeVar("C")


class Family(Generic[C]):
    """A named metric with label names; each distinct label set is one child (a series).

    Past `Settings.max_label_sets` children, new label sets all share one overflow child labelled
    `overflow="true"` (a warning is logged once), so memory stays bounded and nothing is lost.
    """

    kind: ClassVar[str]
    child_type: ClassVar[type]

    def __init__(self, name: str, description: str, labelnames: tuple[str, ...],
                 settings: Settings):
        self.name = name
        self.description = description
        self.labelnames = labelnames
        self.settings = settings
        self.created = settings.clock()
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], C] = {}
        self._series: list[tuple[dict[str, str], C]] = []
        self._overflow: C | None = None
        self._direct = None if labelnames else self.labels()

    def labels(self, **labels: object) -> C:
        """The child for these label values (every declared label, no other); cached."""
        try:
            key = tuple([str(labels[name]) for name in self.labelnames])
        except KeyError:
            missing = [name for name in self.labelnames if name not in labels]
            raise MetricError(f"metric {self.name!r} needs the label(s) "
                              f"{', '.join(missing)}") from None
        if len(labels) != len(key):
            self._check_names(labels, self.labelnames)
        child = self._children.get(key)
        return child if child is not None else self._add(key)

    def _add(self, key: tuple[str, ...]) -> C:
        with self._lock:
            child = self._children.get(key)
            if child is not None:
                return child
            if len(self._children) < self.settings.max_label_sets:
                child = self._children[key] = self._new()
                self._series.append((dict(zip(self.labelnames, key, strict=True)), child))
                return child
            if self._overflow is None:
                log.warning("metric %r has more than %d label sets; further ones are recorded "
                            "in one series labelled %s=\"true\"", self.name,
                            self.settings.max_label_sets, OVERFLOW)
                self._overflow = self._new()
                self._series.append(({OVERFLOW: "true"}, self._overflow))
            return self._overflow

    def _new(self) -> C:
        return self.child_type(self.name, self.settings, self.created)

    def _check_names(self, labels: Mapping[str, object], known: tuple[str, ...]) -> None:
        unknown = [name for name in labels if name not in known]
        if unknown:
            raise MetricError(f"metric {self.name!r} has no label(s) {', '.join(unknown)}; its "
                              f"labels: {', '.join(self.labelnames) or 'none'}")

    def _only(self) -> C:
        """The child of a family without labels."""
        if self._direct is None:
            raise MetricError(f"metric {self.name!r} has labels {', '.join(self.labelnames)}: "
                              f"record through .labels(...)")
        return self._direct

    def series(self) -> list[tuple[dict[str, str], C]]:
        """Every child with its labels, the overflow child included."""
        with self._lock:
            return list(self._series)

    def matching(self, labels: Mapping[str, str]) -> list[C]:
        """The children whose labels include every item of `labels`."""
        self._check_names(labels, (*self.labelnames, OVERFLOW))
        wanted = {name: str(value) for name, value in labels.items()}.items()
        return [child for names, child in self.series() if wanted <= names.items()]

    def aggregate(self, stat: str, children: list[C], now: float,
                  window_s: float | None) -> float | None:
        """`stat` over `children` together (see `MetricSource`)."""
        raise NotImplementedError

    def describe(self, child: C, now: float) -> dict[str, float | None]:
        """A child's all-time statistics as plain data."""
        raise NotImplementedError

    def _unsupported(self, stat: str, supported: str) -> MetricError:
        return MetricError(f"statistic {stat!r} does not apply to {self.kind} {self.name!r}; "
                           f"it has {supported}")


class Counter(Family[CounterChild]):
    """Totals that only go up: `value` is the total (the increase over a window), `rate` the
    increase per second."""

    kind = "counter"
    child_type = CounterChild

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def aggregate(self, stat: str, children: list[CounterChild], now: float,
                  window_s: float | None) -> float | None:
        if stat not in ("value", "rate"):
            raise self._unsupported(stat, "value and rate")
        first = self.settings.first_bucket(now, window_s)
        increase = sum(child.events(now, first) for child in children)
        if stat == "value":
            return increase
        return self.settings.rate(increase, now, window_s, self.created)

    def describe(self, child: CounterChild, now: float) -> dict[str, float | None]:
        return {"value": child.value()}


class Gauge(Family[GaugeChild]):
    """Values that go up and down; `value` adds the matching children up (no history kept)."""

    kind = "gauge"
    child_type = GaugeChild

    def set(self, value: float) -> None:
        self._only().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only().dec(amount)

    def aggregate(self, stat: str, children: list[GaugeChild], now: float,
                  window_s: float | None) -> float | None:
        if stat != "value":
            raise self._unsupported(stat, "value")
        return sum(child.value() for child in children)

    def describe(self, child: GaugeChild, now: float) -> dict[str, float | None]:
        return {"value": child.value()}


H = TypeVar("H", bound=HistogramChild)


class Distribution(Family[H]):
    """What histograms and timers share: observations summarized by mergeable sketches."""

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def sketch(self, children: list[H], now: float, window_s: float | None) -> Sketch:
        """The observations of `children` over a window (all time when None), merged."""
        first = self.settings.first_bucket(now, window_s)
        merged = Sketch(self.settings.relative_accuracy)
        for child in children:
            child.merge_into(merged, now, first)
        return merged

    def aggregate(self, stat: str, children: list[H], now: float,
                  window_s: float | None) -> float | None:
        if stat in ("count", "rate"):
            first = self.settings.first_bucket(now, window_s)
            count = sum(child.events(now, first) for child in children)
            return count if stat == "count" else self.settings.rate(count, now, window_s,
                                                                    self.created)
        if stat == "value":
            raise self._unsupported(stat, "count, sum, mean, min, max, stddev, rate and pNN")
        return _statistic(self.sketch(children, now, window_s), stat)

    def describe(self, child: H, now: float) -> dict[str, float | None]:
        sketch = self.sketch([child], now, None)
        stats = ("count", "sum", "mean", "min", "max", "stddev", *SNAPSHOT_QUANTILES)
        return {stat: _statistic(sketch, stat) for stat in stats}


def _statistic(sketch: Sketch, stat: str) -> float | None:
    q = quantile_of(stat)
    if q is not None:
        return sketch.quantile(q)
    return {"count": sketch.count, "sum": sketch.sum, "mean": sketch.mean, "min": sketch.minimum,
            "max": sketch.maximum, "stddev": sketch.stddev}[stat]


class Histogram(Distribution[HistogramChild]):
    """Distributions of observations: count, sum, mean, min, max, stddev, rate and any pNN."""

    kind = "histogram"
    child_type = HistogramChild


class Timer(Distribution[TimerChild]):
    """A histogram of seconds; `time()` measures a block or a (sync or async) function."""

    kind = "timer"
    child_type = TimerChild

    def time(self) -> Timing:
        return self._only().time()
