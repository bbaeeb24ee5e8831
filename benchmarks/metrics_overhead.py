"""Metrics overhead: the cost of recording one observation, and PyAgent's quantile error.

    .venv/bin/python benchmarks/metrics_overhead.py [--values N] [--repeats R]

In one process, on the same lognormal values: ns per observation for list.append (the loop
baseline), prometheus_client Histogram.observe (labelled child cached), the OpenTelemetry SDK
histogram (explicit buckets, a MeterProvider with an in-memory reader), ddsketch's add, and
PyAgent's Histogram.observe, both recording only (the buffer never fills, so nothing is folded)
and amortized (default batch, every fold and the final read included). Each pass times a fresh
instrument; each figure is the median of R passes, taken in turn so that machine noise spreads
evenly, and includes the Python loop that feeds the values. Quantile error compares PyAgent's
p50/p90/p99/p99.9 with exact numpy quantiles (method="lower", the rank definition DDSketch
answers).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ddsketch import LogCollapsingLowestDenseDDSketch
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram as PrometheusHistogram

from pyagent.bench.provenance import provenance, write_result
from pyagent.observe.metrics import MetricsRegistry

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("prometheus-client", "opentelemetry-sdk", "ddsketch", "numpy")
QUANTILES = (0.5, 0.9, 0.99, 0.999)
SEED = 0

Bench = Callable[[list[float]], None]  # records every value into one fresh instrument


def baseline() -> Bench:
    def run(values: list[float]) -> None:
        sink: list[float] = []
        record = sink.append
        for value in values:
            record(value)
    return run


def prometheus() -> Bench:
    child = PrometheusHistogram("latency_seconds", "Latency.", ("agent",),
                                registry=CollectorRegistry()).labels(agent="coder")

    def run(values: list[float]) -> None:
        record = child.observe
        for value in values:
            record(value)
    return run


def opentelemetry() -> Bench:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    histogram = provider.get_meter("bench").create_histogram("latency", unit="s")
    attributes = {"agent": "coder"}  # the Python SDK has no bound instruments

    def run(values: list[float]) -> None:
        record = histogram.record
        for value in values:
            record(value, attributes)
    return run


def ddsketch() -> Bench:
    sketch = LogCollapsingLowestDenseDDSketch(0.01)

    def run(values: list[float]) -> None:
        record = sketch.add
        for value in values:
            record(value)
    return run


def pyagent(batch: int | None) -> Bench:
    """PyAgent's histogram child; `batch` None keeps the default (folds included in the timing),
    otherwise a buffer larger than the run so that only recording is timed."""
    registry = MetricsRegistry() if batch is None else MetricsRegistry(batch=batch)
    child = registry.histogram("latency_seconds", "Latency.", ("agent",)).labels(agent="coder")

    def run(values: list[float]) -> None:
        record = child.observe
        for value in values:
            record(value)
        if batch is None:
            registry.query("latency_seconds", "count")  # folds what is left, as any read does
    return run


def time_ns(make: Callable[[], Bench], values: list[float]) -> float:
    bench = make()
    gc.collect()
    start = time.perf_counter()
    bench(values)
    return (time.perf_counter() - start) / len(values) * 1e9


def quantile_errors(values: list[float]) -> dict[str, dict[str, float | None]]:
    registry = MetricsRegistry()
    child = registry.histogram("latency_seconds")
    for value in values:
        child.observe(value)
    exact = np.quantile(np.array(values), QUANTILES, method="lower")
    errors: dict[str, dict[str, float | None]] = {}
    for q, truth in zip(QUANTILES, exact.tolist(), strict=True):
        stat = f"p{q * 100:g}"
        estimate = registry.query("latency_seconds", stat)
        error = None if estimate is None else abs(estimate - truth) / truth
        errors[stat] = {"exact": truth, "pyagent": estimate, "relative_error": error}
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=200_000, help="observations per pass")
    parser.add_argument("--repeats", type=int, default=11, help="timed passes per operation")
    args = parser.parse_args()
    values = np.random.default_rng(SEED).lognormal(0.0, 1.0, args.values).tolist()
    operations = {
        "list.append (baseline)": baseline,
        "prometheus_client Histogram.observe": prometheus,
        "OpenTelemetry SDK histogram.record (explicit buckets)": opentelemetry,
        "ddsketch add": ddsketch,
        "PyAgent Histogram.observe, recording only": lambda: pyagent(args.values + 1),
        "PyAgent Histogram.observe, amortized with folding": lambda: pyagent(None),
    }
    for make in operations.values():  # warm up
        make()(values[:10_000])
    runs: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(args.repeats):
        for name, make in operations.items():
            runs[name].append(time_ns(make, values))
    timings = {name: {"median_ns": statistics.median(ns), "min_ns": min(ns), "max_ns": max(ns),
                      "runs_ns": ns} for name, ns in runs.items()}
    errors = quantile_errors(values)
    settings = MetricsRegistry().settings
    out: dict[str, Any] = {
        "benchmark": "metrics_overhead", "meta": provenance(ROOT, PACKAGES),
        "values": {"n": args.values, "distribution": "lognormal(mean=0, sigma=1)", "seed": SEED},
        "repeats": args.repeats,
        "pyagent_settings": {key: getattr(settings, key) for key in (
            "relative_accuracy", "batch", "bucket_s", "max_window_s")},
        "timings": timings, "quantile_error": errors}
    prometheus_ns = timings["prometheus_client Histogram.observe"]["median_ns"]
    lines = [f"ns per observation, median of {args.repeats} passes over {args.values:,} "
             "lognormal values (min-max in brackets; the Python loop included)", "",
             "| operation | ns per observation | vs prometheus_client |", "|---|---|---|"]
    lines += [f"| {name} | {t['median_ns']:.0f} ({t['min_ns']:.0f}-{t['max_ns']:.0f}) "
              f"| {t['median_ns'] / prometheus_ns:.2f}x |" for name, t in timings.items()]
    lines += ["", "PyAgent quantiles against exact numpy quantiles (method=\"lower\"), "
              f"relative accuracy {settings.relative_accuracy:g}", "",
              "| quantile | exact | PyAgent | relative error |", "|---|---|---|---|"]
    lines += [f"| {stat} | {e['exact']:.4f} | {e['pyagent']:.4f} | {e['relative_error']:.3%} |"
              for stat, e in errors.items()]
    write_result(RESULTS, "metrics-overhead", out, lines)


if __name__ == "__main__":
    main()
