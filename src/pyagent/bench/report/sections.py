"""Report sections, one kind of result each: token and cost accounting, latency distributions
from a metrics snapshot, memory over time, alerts, and any benchmark result with provenance.

`sections_for(name, data)` recognises a result by its shape; a result nothing recognises is an
error naming it, so a report never silently leaves one out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyagent.bench.report import figures
from pyagent.bench.report.records import flatten
from pyagent.errors import ConfigError

Data = Mapping[str, Any]
QUANTILES = ("p50", "p90", "p95", "p99")


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Section:
    """One titled part of a report: notes, plots (inline SVG) and tables."""

    title: str
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def table(records: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Table:
    """A table of flattened records (all their columns unless `columns` is given)."""
    flat = [flatten(record) for record in records]
    names = list(columns or dict.fromkeys(key for record in flat for key in record))
    return Table(names, [[record.get(name, "") for name in names] for record in flat])


def tokens_section(name: str, data: Data) -> list[Section]:
    """Tokens and cost by agent and by model (TokenTracker.to_dict())."""
    totals = data["totals"]
    section = Section(f"Tokens and cost: {name}")
    cost = totals.get("cost")
    unknown = totals.get("unknown_calls", 0)
    section.notes.append(
        f"{totals['calls']} LLM calls, {totals['prompt_tokens']} prompt tokens "
        f"({totals['cached_tokens']} cached), {totals['completion_tokens']} output tokens; "
        f"cost {'unknown' if cost is None else f'${cost}'}"
        + (f" ({unknown} calls of unknown price not included)" if unknown else ""))
    for key in ("agent", "model"):
        groups = data["by"].get(key, [])
        if not groups:
            continue
        labels = [str(g["name"]) for g in groups]
        section.figures.append(figures.stacked_bars(labels, {
            "uncached prompt": [g["prompt_tokens"] - g["cached_tokens"] for g in groups],
            "cached prompt": [g["cached_tokens"] for g in groups],
            "output": [g["completion_tokens"] for g in groups]}, f"tokens by {key}", "tokens"))
        priced = [g for g in groups if g.get("cost") is not None]
        if priced:
            section.figures.append(figures.stacked_bars(
                [str(g["name"]) for g in priced], {"cost": [float(g["cost"]) for g in priced]},
                f"cost by {key} (known prices)", "USD"))
        section.tables.append(table(groups))
    strategies = data.get("strategies", {})
    rows = [{"strategy": name, **strategies[name]} for name in ("caching", "batching")
            if strategies.get(name)]
    if rows:
        section.tables.append(table(rows))
    if strategies.get("measured"):
        section.tables.append(table(strategies["measured"]))
    if data.get("prices"):
        section.tables.append(table(data["prices"]["sources"]))
    return [section]


def metrics_section(name: str, data: Data) -> list[Section]:
    """Latency distributions of every histogram, and counter totals (a metrics snapshot)."""
    sections = []
    for metric, family in data["metrics"].items():
        series = family["series"]
        if family["type"] in ("histogram", "timer"):
            measured = [s for s in series if s.get("count")]
            section = Section(f"Distribution: {metric}")
            if family.get("description"):
                section.notes.append(family["description"])
            if measured:
                labels = [_labels(s["labels"]) for s in measured]
                section.figures.append(figures.quantile_ranges(
                    labels, [{q: s[q] for q in QUANTILES} for s in measured], metric,
                    "seconds" if metric.endswith("_seconds") else "value"))
            section.tables.append(table(
                [{"series": _labels(s["labels"]), **{k: v for k, v in s.items() if k != "labels"}}
                 for s in series]))
            sections.append(section)
    counters = [{"metric": metric, "series": _labels(s["labels"]), "value": s.get("value")}
                for metric, family in data["metrics"].items()
                if family["type"] in ("counter", "gauge") for s in family["series"]]
    if counters:
        sections.append(Section(f"Counters and gauges: {name}", tables=[table(counters)]))
    return sections


def memory_section(name: str, data: Data) -> list[Section]:
    """RSS (and KV bytes) over time with the growth pattern found in it (MemoryReport.to_dict())."""
    section = Section(f"Memory: {name}")
    mib = 1024 * 1024
    pattern = data.get("pattern") or {}
    section.notes.append(
        f"{len(data['samples'])} samples every {data['interval_s']} s over "
        f"{data['duration_s']:.1f} s; RSS {data['start_rss'] / mib:.1f} -> "
        f"{data['end_rss'] / mib:.1f} MiB, peak {data['peak_rss'] / mib:.1f} MiB; growth "
        f"pattern: {pattern.get('kind', 'n/a')} ({pattern.get('reason', '')})")
    if data.get("leak"):
        leak = data["leak"]
        section.notes.append(f"leak test: {'LEAKING' if leak['leaking'] else 'no leak'} "
                             f"({leak['reason']})")
    samples = data["samples"]
    if samples:
        series = {"RSS (MiB)": [s["rss"] / mib for s in samples]}
        if any(s.get("kv") for s in samples):
            series["KV cache (MiB)"] = [(s.get("kv") or 0) / mib for s in samples]
        section.figures.append(figures.lines([s["t"] for s in samples], series,
                                             "memory over time", "seconds", "MiB"))
    if data.get("gc"):
        gc = data["gc"]
        section.tables.append(table([{"generation": g, "collections": gc["counts"][g],
                                      **gc["summary"][g]} for g in range(len(gc["counts"]))]))
    return [section]


def alerts_section(name: str, data: Sequence[Data]) -> list[Section]:
    """Every alert's state (AlertEngine.state())."""
    firing = sum(1 for alert in data if alert["state"] == "firing")
    return [Section(f"Alerts: {name}", notes=[f"{len(data)} alerts, {firing} firing"],
                    tables=[table(data, ["group", "alert", "state", "value", "expr",
                                         "labels.severity", "annotations.summary",
                                         "active_since"])])]


def health_section(name: str, data: Data) -> list[Section]:
    """A health report: status, score and each objective's check (HealthReport.to_dict())."""
    rows = [{"objective": objective, **check} for objective, checks in data["checks"].items()
            for check in checks]
    return [Section(f"Health: {name}", notes=[f"status {data['status']}, score "
                                              f"{data['score']}"], tables=[table(rows)])]


def benchmark_section(name: str, data: Data) -> list[Section]:
    """A benchmark result: where it came from, then its results as tables."""
    meta = data["meta"]
    section = Section(f"Benchmark: {data.get('benchmark', name)}")
    section.notes.append(f"command: {meta.get('command')}; date {meta.get('date')}; "
                         f"commit {(meta.get('git') or {}).get('commit')}")
    section.tables.append(table([meta.get("machine", {})]))
    for key in ("summary", "results"):
        value = data.get(key)
        if isinstance(value, list) and value and isinstance(value[0], Mapping):
            section.tables.append(table(value))
        elif isinstance(value, Mapping):
            rows = [{"name": k, **(v if isinstance(v, Mapping) else {"value": v})}
                    for k, v in value.items()]
            section.tables.append(table(rows))
    return [section]


def _labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items()) or "(all)"


Recognizer = tuple[Callable[[Data], bool], Callable[[str, Data], list[Section]]]
RECOGNIZERS: list[Recognizer] = [
    (lambda d: {"records", "totals", "by"} <= d.keys(), tokens_section),
    (lambda d: "metrics" in d and "relative_accuracy" in d, metrics_section),
    (lambda d: {"samples", "peak_rss"} <= d.keys(), memory_section),
    (lambda d: {"status", "score", "checks"} <= d.keys(), health_section),
    (lambda d: isinstance(d.get("meta"), Mapping), benchmark_section),
]


def sections_for(name: str, data: Any) -> list[Section]:
    """The sections that show `data` (a parsed result file called `name`); a file holding an
    object with several results under their own keys shows each of them."""
    if isinstance(data, list) and all(isinstance(a, Mapping) and {"alert", "state"} <= a.keys()
                                      for a in data):
        return alerts_section(name, data)
    if isinstance(data, Mapping):
        for matches, render in RECOGNIZERS:
            if matches(data):
                return render(name, data)
        if data and all(isinstance(v, Mapping | list) for v in data.values()):
            return [s for key, value in data.items() for s in sections_for(f"{name}: {key}",
                                                                            value)]
    raise ConfigError(f"{name}: not a result this report knows how to show (expected token "
                      "accounting, a metrics snapshot, a memory profile, alerts or a benchmark "
                      "result with 'meta')")
