"""Exposing a registry: Prometheus text format (through prometheus_client) and JSON.

Histograms and timers are exposed as Prometheus summaries: `_count` and `_sum` over all time, and
`quantile` samples (0.5, 0.9, 0.95, 0.99) over the registry's longest window (`max_window_s`,
10 minutes by default, as the Go client's summaries do), NaN when that window saw no observation.
Summaries rather than bucketed histograms, because the sketches answer quantiles directly within
their relative accuracy, where fixed buckets would need `histogram_quantile` to interpolate.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.samples import Sample

from pyagent.observe.metrics.registry import MetricsRegistry
from pyagent.observe.metrics.types import Counter, Gauge

QUANTILES = (0.5, 0.9, 0.95, 0.99)


class RegistryCollector:
    """A prometheus_client collector yielding every family of a `MetricsRegistry`."""

    def __init__(self, registry: MetricsRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        now = self.registry.settings.clock()
        window_s = self.registry.settings.max_window_s
        for family in self.registry.families():
            series = family.series()
            if isinstance(family, Counter):
                metric: Metric = CounterMetricFamily(family.name, family.description)
                metric.samples += [Sample(f"{metric.name}_total", labels, child.value())
                                   for labels, child in series]
            elif isinstance(family, Gauge):
                metric = GaugeMetricFamily(family.name, family.description)
                metric.samples += [Sample(family.name, labels, child.value())
                                   for labels, child in series]
            else:  # a histogram or a timer
                metric = SummaryMetricFamily(family.name, family.description)
                for labels, child in series:
                    total = family.sketch([child], now, None)
                    recent = family.sketch([child], now, window_s)
                    metric.samples += [
                        *(Sample(family.name, {**labels, "quantile": str(q)},
                                 _nan_if_none(recent.quantile(q))) for q in QUANTILES),
                        Sample(f"{family.name}_count", labels, total.count),
                        Sample(f"{family.name}_sum", labels, total.sum)]
            yield metric


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def to_prometheus(registry: MetricsRegistry) -> str:
    """The registry in the Prometheus text exposition format."""
    collectors = CollectorRegistry()
    collectors.register(RegistryCollector(registry))
    return generate_latest(collectors).decode()


def to_json(registry: MetricsRegistry) -> str:
    """The registry's `snapshot()` as JSON."""
    return json.dumps(registry.snapshot(), indent=1, sort_keys=True)
