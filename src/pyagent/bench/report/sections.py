"""Report sections, one kind of result each: token and cost accounting, latency distributions
from a metrics snapshot, memory over time, alerts, and any benchmark result with provenance.

`sections_for(name, data)` recognises a result by its shape; a result nothing recognises is an
error naming it, so a report never silently leaves one out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyagent.bench.report import figures, generic, shapes
from pyagent.bench.report.fmt import is_number, quantity
from pyagent.bench.report.headlines import Check, Summary, benchmark_name, summarize
from pyagent.bench.report.tables import Table, table
from pyagent.errors import ConfigError

Data = Mapping[str, Any]
QUANTILES = ("p50", "p90", "p95", "p99")
PROVENANCE = ("command", "git", "date", "machine", "threads", "versions")


@dataclass
class Section:
    """One titled part of a report: its summary line, notes, plots (inline SVG) and tables."""

    title: str
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    summary: Summary | None = None


def tokens_section(name: str, data: Data) -> list[Section]:
    """Tokens and cost by agent and by model (TokenTracker.to_dict())."""
    totals = data["totals"]
    section = Section(f"Tokens and cost: {name}")
    cost = totals.get("cost")
    unknown = totals.get("unknown_calls", 0)
    shown_cost = "unknown" if cost is None else quantity(cost, "USD")[0]
    section.notes.append(
        f"{totals['calls']:,} LLM calls, {totals['prompt_tokens']:,} prompt tokens "
        f"({totals['cached_tokens']:,} cached, {totals.get('cache_write_tokens', 0):,} written "
        f"to a cache), {totals['completion_tokens']:,} output tokens; cost {shown_cost}"
        + (f" ({unknown} calls of unknown price not included)" if unknown and cost else ""))
    section.summary = Summary(name, [f"{totals['calls']:,} LLM calls",
                                     f"{totals['prompt_tokens'] + totals['completion_tokens']:,}"
                                     " tokens", f"cost {shown_cost}"])
    for key in ("agent", "model"):
        groups = data["by"].get(key, [])
        if not groups:
            continue
        labels = [str(g["name"]) for g in groups]
        written = [g.get("cache_write_tokens", 0) for g in groups]
        series = {"uncached prompt": [g["prompt_tokens"] - g["cached_tokens"] - w
                                      for g, w in zip(groups, written, strict=True)],
                  "cached prompt": [g["cached_tokens"] for g in groups],
                  "written to cache": written,
                  "output": [g["completion_tokens"] for g in groups]}
        series = {k: v for k, v in series.items() if any(v)}
        if series:
            section.figures.append(figures.stacked_bars(labels, series, f"tokens by {key}",
                                                        "tokens"))
        priced = [g for g in groups if g.get("cost") is not None and float(g["cost"])]
        if priced:
            section.figures.append(figures.stacked_bars(
                [str(g["name"]) for g in priced], {"cost": [float(g["cost"]) for g in priced]},
                f"cost by {key} (known prices)", "USD"))
        section.tables.append(table(groups, title=f"by {key}"))
    strategies = data.get("strategies", {})
    rows = [{"strategy": name, **strategies[name]} for name in ("caching", "batching")
            if strategies.get(name)]
    if rows:
        section.tables.append(table(rows, title="strategies"))
    if strategies.get("measured"):
        section.tables.append(table(strategies["measured"], title="measured strategies"))
    if data.get("prices"):
        section.tables.append(table(data["prices"]["sources"], title="price sources"))
    return [section]


def metrics_section(name: str, data: Data) -> list[Section]:
    """Latency distributions of every histogram, and counter totals (a metrics snapshot)."""
    sections = []
    for metric, family in data["metrics"].items():
        series = family["series"]
        if family["type"] in ("histogram", "timer"):
            measured = [s for s in series if s.get("count")
                        and all(is_number(s.get(q)) for q in QUANTILES)]
            section = Section(f"Distribution: {metric}")
            if family.get("description"):
                section.notes.append(family["description"])
            if measured:
                labels = [_labels(s["labels"]) for s in measured]
                section.figures.append(figures.quantile_ranges(
                    labels, [{q: s[q] for q in QUANTILES} for s in measured], metric,
                    "seconds" if metric.endswith("_seconds") else "value"))
            unit = "_s" if metric.endswith("_seconds") else ""
            section.tables.append(table(
                [{"series": _labels(s["labels"]),
                  **{f"{k}{unit if k in (*QUANTILES, 'min', 'max', 'mean') else ''}": v
                     for k, v in s.items() if k != "labels"}} for s in series]))
            sections.append(section)
    counters = [{"metric": metric, "series": _labels(s["labels"]), "value": s.get("value")}
                for metric, family in data["metrics"].items()
                if family["type"] in ("counter", "gauge") for s in family["series"]]
    if counters:
        sections.append(Section(f"Counters and gauges: {name}", tables=[table(counters)]))
    if sections:
        sections[0].summary = Summary(name, [f"{len(data['metrics'])} metrics"])
    return sections


def memory_section(name: str, data: Data) -> list[Section]:
    """RSS (and KV bytes) over time with the growth pattern found in it (MemoryReport.to_dict())."""
    section = Section(f"Memory: {name}")
    pattern = data.get("pattern") or {}
    peak = quantity(data["peak_rss"], "bytes")[0]
    section.notes.append(
        f"{len(data['samples']):,} samples every {data['interval_s']} s over "
        f"{data['duration_s']:.1f} s; RSS {quantity(data['start_rss'], 'bytes')[0]} -> "
        f"{quantity(data['end_rss'], 'bytes')[0]}, peak {peak}; growth "
        f"pattern: {pattern.get('kind', 'n/a')} ({pattern.get('reason', '')})")
    section.summary = Summary(name, [f"peak RSS {peak}",
                                     f"growth pattern {pattern.get('kind', 'n/a')}"])
    if data.get("leak"):
        leak = data["leak"]
        section.notes.append(f"leak test: {'LEAKING' if leak['leaking'] else 'no leak'} "
                             f"({leak['reason']})")
        section.summary.checks.append(Check("no memory leak", leak["reason"],
                                            not leak["leaking"]))
    samples = data["samples"]
    if len(samples) >= 2:
        mib = 2**20
        series = {"RSS (MiB)": [s["rss"] / mib for s in samples]}
        if any(s.get("kv") for s in samples):
            series["KV cache (MiB)"] = [(s.get("kv") or 0) / mib for s in samples]
        section.figures.append(figures.lines([s["t"] for s in samples], series,
                                             "memory over time", "seconds", "MiB"))
    if data.get("gc"):
        gc = data["gc"]
        section.tables.append(table([{"generation": g, "collections": gc["counts"][g],
                                      **gc["summary"][g]} for g in range(len(gc["counts"]))],
                                    title="garbage collection"))
    return [section]


def alerts_section(name: str, data: Sequence[Data]) -> list[Section]:
    """Every alert's state (AlertEngine.state())."""
    firing = sum(1 for alert in data if alert["state"] == "firing")
    return [Section(f"Alerts: {name}", notes=[f"{len(data)} alerts, {firing} firing"],
                    tables=[table(data, ["group", "alert", "state", "value", "expr",
                                         "labels.severity", "annotations.summary",
                                         "active_since"])],
                    summary=Summary(name, [f"{len(data)} alerts"],
                                    [Check("no alert firing", f"{firing} firing", not firing)]))]


def health_section(name: str, data: Data) -> list[Section]:
    """A health report: status, score and each objective's check (HealthReport.to_dict())."""
    rows = [{"objective": objective, **check} for objective, checks in data["checks"].items()
            for check in checks]
    return [Section(f"Health: {name}", notes=[f"status {data['status']}, score "
                                              f"{data['score']}"], tables=[table(rows)],
                    summary=Summary(name, [f"score {data['score']}"],
                                    [Check("healthy", str(data["status"]),
                                           data["status"] == "pass")]))]


def benchmark_section(name: str, data: Data) -> list[Section]:
    """A benchmark result: its summary, where it came from, then everything it holds, by shape."""
    meta = data.get("meta") if isinstance(data.get("meta"), Mapping) else {
        k: data[k] for k in PROVENANCE if k in data}
    section = Section(f"Benchmark: {benchmark_name(name, data)}")
    try:
        section.summary = summarize(name, data)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    git = meta.get("git") if isinstance(meta.get("git"), Mapping) else {}
    section.notes.append(f"command: {meta.get('command')}; date {meta.get('date')}; "
                         f"commit {git.get('commit')}")
    if section.summary.checks:
        section.tables.append(table([{"target": c.target, "measured": c.measured, "met": c.met}
                                     for c in section.summary.checks], title="targets"))
    body = {k: v for k, v in data.items()
            if k not in ("meta", "benchmark", *PROVENANCE, "targets")}
    generic.render(body, section.tables, section.figures)
    if isinstance(meta.get("machine"), Mapping):
        section.tables.append(table([meta["machine"]], title="machine"))
    return [section]


def _labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items()) or "(all)"


def _suites(name: str, data: Data) -> list[Section]:
    from pyagent.bench.report.suites import suites_section

    try:
        return suites_section(name, data)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{name}: not a complete suite result ({type(exc).__name__}: {exc})"
                          ) from None


Render = Callable[[str, Data], list[Section]]
RECOGNIZERS: list[tuple[Callable[[Data], bool], Render]] = [
    (lambda d: shapes.looks_like(d, shapes.TokenAccounting), shapes.guarded(
        shapes.TokenAccounting, "token accounting", tokens_section)),
    (lambda d: "metrics" in d and "relative_accuracy" in d, shapes.guarded(
        shapes.MetricsSnapshot, "metrics snapshot", metrics_section)),
    (lambda d: "samples" in d and shapes.looks_like(d, shapes.MemoryProfile), shapes.guarded(
        shapes.MemoryProfile, "memory profile", memory_section)),
    (lambda d: shapes.looks_like(d, shapes.HealthReport), shapes.guarded(
        shapes.HealthReport, "health report", health_section)),
    (lambda d: d.get("benchmark") == "suites" and "records" in d, _suites),
    (lambda d: isinstance(d.get("meta"), Mapping) or {"benchmark", "command", "git"} <= d.keys()
     or {"plan", "rows", "summary"} <= d.keys(), benchmark_section),
]


def sections_for(name: str, data: Any) -> list[Section]:
    """The sections that show `data` (a parsed result file called `name`); a file holding an
    object with several results under their own keys shows each of them."""
    if isinstance(data, list) and data and all(isinstance(a, Mapping) and "alert" in a
                                               for a in data):
        for index, alert in enumerate(data):
            shapes.checked(shapes.Alert, "alert state", f"{name}: alert {index}", alert)
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
