"""The metric aggregator: counters, gauges, histograms, timers and rates with labels, streaming
quantiles from DDSketch over sliding windows, Prometheus and JSON exposition, and a feed that turns
the runtime's events into metrics."""

from pyagent.observe.metrics.exposition import RegistryCollector, to_json, to_prometheus
from pyagent.observe.metrics.feed import MetricsFeed
from pyagent.observe.metrics.registry import MetricsRegistry
from pyagent.observe.metrics.sketch import Sketch
from pyagent.observe.metrics.source import MetricSource
from pyagent.observe.metrics.types import (
    OVERFLOW,
    Counter,
    CounterChild,
    Gauge,
    GaugeChild,
    Histogram,
    HistogramChild,
    MetricError,
    Rate,
    Timer,
    TimerChild,
    Timing,
)

__all__ = [
    "OVERFLOW",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "MetricError",
    "MetricSource",
    "MetricsFeed",
    "MetricsRegistry",
    "Rate",
    "RegistryCollector",
    "Sketch",
    "Timer",
    "TimerChild",
    "Timing",
    "to_json",
    "to_prometheus",
]
