"""Memory profiler: its overhead next to tracemalloc, and its leak verdicts.

    .venv/bin/python benchmarks/memory_profiler.py [--repeats N] [--runs N]

Overhead: an allocation-heavy loop (small dicts and lists built and dropped) timed alone, under
`MemoryProfiler` at its default 0.5 s interval (RSS sampler thread + GC callbacks) and under
tracemalloc with 1 frame; the variants take turns (in rotated order) and the table gives medians
and the mean paired overhead with a bootstrap 95% interval. Leak detection:
`find_leak` with 20 iterations on a stable workload, a sawtooth (2 MiB blocks held, then freed
every 4 iterations) and a 1 MiB-per-iteration leak, each run `--runs` times; for the leak also
the fewest iterations with which a fresh `find_leak` run says "leaking".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyagent.bench.memory import (
    LEAK_THRESHOLD,
    MemoryProfiler,
    ProcessTree,
    find_leak,
)
from pyagent.bench.provenance import provenance, write_result
from pyagent.bench.stats import bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIB = 1 << 20
ITERATIONS = 20


def churn(rounds: int = 60) -> None:
    """Build and drop many small dicts and lists."""
    for _ in range(rounds):
        items = [{"id": i, "tags": [i, i + 1], "name": f"n{i}"} for i in range(20_000)]
        del items


def timed(run: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of all this process's threads, return value) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = run()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def under_profiler() -> dict[str, Any]:
    """What the profiler saw, to show it was at work."""
    with MemoryProfiler() as prof:
        churn()
    report = prof.report
    assert report is not None and report.gc is not None
    return {"samples": len(report.samples), "gc_counts": report.gc.counts,
            "gc_pause_total_s": sum(map(sum, report.gc.pauses_s))}


def under_tracemalloc() -> None:
    tracemalloc.start(1)
    try:
        churn()
    finally:
        tracemalloc.stop()


def overhead(repeats: int) -> dict[str, Any]:
    """Wall and CPU seconds per variant over alternating repeats; the overhead is the mean of
    the paired per-repeat ratios to `alone` (wall: with its bootstrap 95% interval)."""
    variants: dict[str, Callable[[], Any]] = {"alone": churn, "MemoryProfiler (0.5 s)":
                                              under_profiler, "tracemalloc (1 frame)":
                                              under_tracemalloc}
    churn()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    seen: dict[str, Any] = {}
    names = list(variants)
    for repeat in range(repeats):
        shift = repeat % len(names)  # rotate, so that no variant always runs first
        for name in names[shift:] + names[:shift]:
            seconds, cpu_seconds, seen[name] = timed(variants[name])
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    out: dict[str, Any] = {}
    for name, values in wall.items():
        mean, low, high = bootstrap_ci(paired_pct(values, wall["alone"]))
        q1, _, q3 = statistics.quantiles(values, n=4)
        out[name] = {"median_s": statistics.median(values), "iqr_s": q3 - q1, "times_s": values,
                     "overhead_pct": mean, "overhead_ci_pct": [low, high], "cpu_s": cpu[name],
                     "cpu_overhead_pct": statistics.fmean(paired_pct(cpu[name], cpu["alone"])),
                     "last_run": seen[name]}
    return out


def paired_pct(values: list[float], base: list[float]) -> list[float]:
    """Each repeat's time relative to the same repeat's `alone` time, in percent."""
    return [(v / b - 1) * 100 for v, b in zip(values, base, strict=True)]


def sample_cost_us(calls: int = 2000) -> float:
    """Median cost of one RSS reading of this process tree, in microseconds."""
    tree = ProcessTree()
    costs = [timed(tree.rss)[0] for _ in range(calls)]
    return statistics.median(costs) * 1e6


def stable() -> Callable[[], None]:
    def work() -> None:
        data = [{"i": i, "s": str(i)} for i in range(50_000)]
        del data
    return work


def sawtooth() -> Callable[[], None]:
    held: list[bytes] = []

    def work() -> None:
        held.append(os.urandom(2 * MIB))
        if len(held) == 4:
            held.clear()
    return work


def leak() -> Callable[[], None]:
    kept: list[bytes] = []
    return lambda: kept.append(os.urandom(MIB))


WORKLOADS = {"stable": stable, "sawtooth (2 MiB x 4, freed)": sawtooth,
             "leak 1 MiB/iteration": leak}


def leak_detection(runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, make in WORKLOADS.items():
        verdicts = [find_leak(make(), iterations=ITERATIONS) for _ in range(runs)]
        found = [v.detected_at for v in verdicts if v.detected_at is not None]
        out[name] = {
            "leaking_runs": sum(v.leaking for v in verdicts), "runs": runs,
            "kib_per_iteration_median": statistics.median(v.bytes_per_iteration
                                                          for v in verdicts) / 1024,
            "p_value_median": statistics.median(v.p_value for v in verdicts),
            "patterns": dict(Counter(v.pattern.kind for v in verdicts)),
            "detected_at_median": statistics.median(found) if found else None,
            "verdicts": [v.to_dict() for v in verdicts]}
    out["leak 1 MiB/iteration"]["fewest_iterations"] = next(
        (k for k in range(4, ITERATIONS + 1) if find_leak(leak(), iterations=k).leaking), None)
    return out


def table(results: dict[str, Any]) -> list[str]:
    lines = [f"Overhead (median of {len(results['overhead']['alone']['times_s'])} repeats; "
             f"one RSS sample costs {results['sample_cost_us']:.0f} us)", "",
             "| variant | wall s (median) | IQR s | wall overhead % (mean) | 95% CI % "
             "| CPU overhead % |", "|---|---|---|---|---|---|"]
    for name, row in results["overhead"].items():
        low, high = row["overhead_ci_pct"]
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['iqr_s']:.3f} "
                     f"| {row['overhead_pct']:+.1f} | {low:+.1f} to {high:+.1f} "
                     f"| {row['cpu_overhead_pct']:+.1f} |")
    lines += ["", f"Leak detection (find_leak, {ITERATIONS} iterations, threshold "
              f"{LEAK_THRESHOLD // 1024} KiB/iteration)", "",
              "| workload | leaking runs | KiB/iteration (median) | 95% CI (run 1) "
              "| p-value (median) | pattern | detected at (median) | fewest iterations |",
              "|---|---|---|---|---|---|---|---|"]
    for name, row in results["leaks"].items():
        first = row["verdicts"][0]
        patterns = ", ".join(f"{k} x{n}" for k, n in row["patterns"].items())
        lines.append(
            f"| {name} | {row['leaking_runs']}/{row['runs']} "
            f"| {row['kib_per_iteration_median']:.1f} "
            f"| {first['low'] / 1024:.1f} to {first['high'] / 1024:.1f} "
            f"| {row['p_value_median']:.2g} | {patterns} | {row['detected_at_median'] or '-'} "
            f"| {row.get('fewest_iterations') or '-'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12, help="timed repeats per variant")
    parser.add_argument("--runs", type=int, default=5, help="find_leak runs per workload")
    args = parser.parse_args()
    results: dict[str, Any] = {"sample_cost_us": sample_cost_us(),
                               "overhead": overhead(args.repeats),
                               "leaks": leak_detection(args.runs)}
    out = {"benchmark": "memory_profiler", "meta": provenance(ROOT, ("psutil", "scipy",
                                                                     "statsmodels")),
           "results": results}
    lines = table(results)
    write_result(RESULTS, "memory-profiler", out, lines)


if __name__ == "__main__":
    main()
